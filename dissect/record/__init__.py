"""Recording layer activations into the activation cache (DESIGN.md §4a).

- :func:`load_model` builds a model from a spec (torchvision name, ``module:callable``, TorchScript
  file) through a registry of model sources (:func:`register_model_source`) and loads weights;
- :func:`list_layers` / :func:`layer_table` discover layer names, :func:`format_layer_table` /
  :func:`describe_layers` write the ``dissect layers`` listing;
- :func:`resolve_layers` expands names and wildcards, :class:`LayerRecorder` hooks them;
- :func:`check_input_size` probes the model at the dataset's image size (what it expects, the
  unit-map sizes and token layouts of the layers);
- :func:`record_activations` runs the model once over a dataset and writes one cache per layer;
- :func:`open_cache` and :class:`CacheReader` read the caches.
"""

from __future__ import annotations

from dissect.record.cache import (
    CACHE_DTYPES,
    COMPRESSIONS,
    SCHEMA_VERSION,
    CacheInfo,
    CacheReader,
    cache_path,
    open_cache,
    outputs_path,
)
from dissect.record.models import (
    LayerRow,
    ModelSource,
    describe_layers,
    format_layer_table,
    layer_table,
    list_layers,
    load_model,
    load_weights,
    model_sources,
    register_model_source,
    weights_hash,
)
from dissect.record.recorder import (
    AUTOCAST_DTYPES,
    InputProbe,
    SmallMapsWarning,
    check_input_size,
    expected_input_size,
    layout_options,
    record_activations,
    resolve_device,
)
from dissect.record.trace import (
    LAYOUTS,
    TOKEN_LAYOUTS,
    LayerRecorder,
    LayoutOptions,
    describe_layout,
    resolve_layers,
)

__all__ = [
    "AUTOCAST_DTYPES",
    "CACHE_DTYPES",
    "COMPRESSIONS",
    "LAYOUTS",
    "SCHEMA_VERSION",
    "TOKEN_LAYOUTS",
    "CacheInfo",
    "CacheReader",
    "InputProbe",
    "LayerRecorder",
    "LayerRow",
    "LayoutOptions",
    "ModelSource",
    "SmallMapsWarning",
    "cache_path",
    "check_input_size",
    "describe_layers",
    "describe_layout",
    "expected_input_size",
    "format_layer_table",
    "layer_table",
    "layout_options",
    "list_layers",
    "load_model",
    "load_weights",
    "model_sources",
    "open_cache",
    "outputs_path",
    "record_activations",
    "register_model_source",
    "resolve_device",
    "resolve_layers",
    "weights_hash",
]
