"""The analytic machines, one module per machine (docs/theory.md §2, §7): ``ideal``,
``equivariant``, ``local``, ``els``, ``gaussian``, ``nearest``, ``pca_locality``, ``soft``
(els_soft), the obvious reference path (``reference``), patch provenance (``posterior``) and
``factory`` (``make_machine``: any machine as a sampler model).

A machine's public function takes the time t and turns it into its coefficients a, b² once;
everything it calls in ``engines`` takes those. Imports ``engines`` and ``core``."""
