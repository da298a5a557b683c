"""The conventions every other layer shares (docs/theory.md §1, §3, §6): noise schedules and
the coefficients a, b² they give (``schedules``), the forward process (``forward``), score ↔ ε̂ ↔
x̂_0 (``conversions``), the one streamed softmax (``softmax``), the one sampler (``sampler``),
k×k windows and borders (``patches``), input checks (``validation``), data sets (``data``) and the cache directory (``cachedir``).

Imports nothing above it: ``core`` is the bottom layer."""
