"""Grain input pipelines: dataset sources, image transforms, aspect-ratio buckets, array caches."""

from sga_jax.data.buckets import bucket_name, make_buckets, nearest_bucket
from sga_jax.data.cache import ArrayCacheSource, ArrayCacheWriter, open_cache
from sga_jax.data.pipeline import (
    BatchPlan,
    DatasetIndex,
    Pipeline,
    buckets_from_config,
    default_data_config,
    index_dataset,
    make_pipeline,
)
from sga_jax.data.sources import (
    CaptionsTxtSource,
    MetadataJsonlSource,
    TfdsSource,
    open_source,
    skimage_sample_dataset,
)
from sga_jax.data.transforms import BadRecord, load_image, probe

__all__ = [
    "ArrayCacheSource", "ArrayCacheWriter", "BadRecord", "BatchPlan", "CaptionsTxtSource", "DatasetIndex",
    "MetadataJsonlSource", "Pipeline", "TfdsSource", "bucket_name", "buckets_from_config", "default_data_config",
    "index_dataset", "load_image", "make_buckets", "make_pipeline", "nearest_bucket", "open_cache", "open_source",
    "probe", "skimage_sample_dataset",
]
