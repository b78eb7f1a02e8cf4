"""Class activation maps drawn over the images they explain (``medimg explain``, and the
overlays ``label`` / ``triage --explain DIR`` write): :mod:`serving.explain.maps` gets the
maps (from a Triton server or in process), :mod:`serving.explain.overlay` draws them::

    python -c "from serving.clients.sync import TritonClassifier; from serving.explain import write_overlays; \
from serving.clients.inputs import collect_items; items, _ = collect_items(['../shared/data/samples']); \
c = TritonClassifier('127.0.0.1:8001', 'grpc'); print([e.as_text() for e in write_overlays(c, items, 'explain')])"
"""

from serving.explain.maps import Explainer, Explanation, LocalExplainer, ServerExplainer
from serving.explain.overlay import render_overlay, upsample, write_overlays

__all__ = [
    "Explainer",
    "Explanation",
    "LocalExplainer",
    "ServerExplainer",
    "render_overlay",
    "upsample",
    "write_overlays",
]
