"""How the patch machines are computed fast and exactly (docs/theory.md §2, §9): the passes
(which queries meet which candidates, ``layout``), the exact engines of a pass (``window``,
``row``, ``interior``, ``border``, ``local``), candidate banks and streaming (``passes``), the
fused CPU kernels (``native`` + ``native_local.cc``) and the one engine selector
(``autotune``: measure and cache; ``select``: which engines apply and the probes).

Every function here takes the coefficients a, b² (never a time or a schedule: a machine turns
t into them once). Imports only ``core``."""
