"""Training tasks for the generic loop (:func:`lightclip.training.train`), one home per paper.

* :mod:`~lightclip.tasks.image_text`: CLIP training on image-title pairs (the shared base).
* :mod:`~lightclip.tasks.fashionklip`: FashionKLIP, CLIP plus concept-level alignment.
* :mod:`~lightclip.tasks.cocaclip`: CocaCLIP/ConaCLIP, a student distilled over the graph.

The two paper tasks are siblings: each extends the image-text task with its own extras only.
"""

from lightclip.tasks.cocaclip import DistillBatch, DistillTask
from lightclip.tasks.fashionklip import ConceptBatch, ConceptInputs, FashionKLIPBatch, FashionKLIPTask
from lightclip.tasks.image_text import ClipBatch, ImageTextTask, PairSet, split_metrics

__all__ = [
    "ClipBatch",
    "ConceptBatch",
    "ConceptInputs",
    "DistillBatch",
    "DistillTask",
    "FashionKLIPBatch",
    "FashionKLIPTask",
    "ImageTextTask",
    "PairSet",
    "split_metrics",
]
