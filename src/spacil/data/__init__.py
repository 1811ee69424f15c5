"""The data stage: the benchmark protocol (`datasets`), class names (`names`), reading trees and images (`folders`), and
`spacil data check` (`check`). The names below are the stage's public interface."""

from spacil.data.datasets import (CLIP_MEAN, CLIP_STD, CUSTOM_PREFIX, DATASETS, DatasetSpec, class_order, dataset_spec,
                                  image_transform, load_templates, task_boundaries, task_sizes)
from spacil.data.folders import DatasetIndex, SplitIndex, index_dataset, open_dataset, open_store_image, pil_rgb
from spacil.data.names import check_names, clean_class_name, load_names_file, normalise_name

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "CUSTOM_PREFIX", "DATASETS", "DatasetIndex", "DatasetSpec", "SplitIndex", "check_names",
    "class_order", "clean_class_name", "dataset_spec", "image_transform", "index_dataset", "load_names_file",
    "load_templates", "normalise_name", "open_dataset", "open_store_image", "pil_rgb", "task_boundaries", "task_sizes",
]
