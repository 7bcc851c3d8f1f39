"""The study on top of the method (docs/design.md §2): :mod:`~hmqat.study.pipeline` (``Study``
and the papermill driver), :mod:`~hmqat.study.ablation` (notebook 04's runner),
:mod:`~hmqat.study.reporting` (tables, manifest), :mod:`~hmqat.study.plotting` (figures) and
:mod:`~hmqat.study.cli` (the torchrun command line). Nothing below this package imports it."""
