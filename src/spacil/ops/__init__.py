"""SPA's building blocks, shared by the methods: optimal transport (`ot`), class-wise Gaussians (`gaussian`),
task-specific projectors (`projectors`) and semantic-guided patch selection (`patch_selection`). They import nothing
from spacil but each other."""
