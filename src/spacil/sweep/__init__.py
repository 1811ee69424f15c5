"""Sweeps: the grid (`grid`), one cell of it (`cell`), the engines that run cells (`local`, `slurm`: both take
cells from `cell` and import neither each other nor `grid`) and the sweep report (`report`)."""
