"""Retrieval evaluation, in both directions (image -> text and text -> image).

* :mod:`~lightclip.evaluation.ranking`: positives (who counts as whose answer) and ranks/top-k
  under the deterministic tie rule, one direction at a time;
* :mod:`~lightclip.evaluation.one_matmul`: the same ranks for both directions from one matrix
  product (what the metrics use);
* :mod:`~lightclip.evaluation.metrics`: every metric of a model on a split
  (:func:`evaluate_retrieval`, CLIP_benchmark-shaped; its docstring holds the semantics) and the
  short form used during training (:func:`retrieval_metrics`);
* :mod:`~lightclip.evaluation.intervals`: per-item scores and the paired bootstrap interval of
  one model's mean recall relative to another's (the promotion gate's sampling error);
* :mod:`~lightclip.evaluation.embedding`: the one batched-embedding path every caller uses;
* :mod:`~lightclip.evaluation.stage`: the ``evaluate`` stage (its files and figures).
"""

from lightclip.evaluation.embedding import Embeddings, embed_images, embed_pairs, embed_split, embed_texts, inference, tokenize_checked
from lightclip.evaluation.errors import EvaluationError
from lightclip.evaluation.intervals import RatioInterval, item_recall_scores, paired_ratio_interval
from lightclip.evaluation.metrics import KS, attribute_precision, evaluate_retrieval, recall_at_k, retrieval_metrics
from lightclip.evaluation.ranking import (
    DIRECTIONS,
    Positives,
    catalogue_positives,
    group_pairs,
    image_content_groups,
    ranks_per_direction,
    retrieval_ranks,
    title_groups,
)
from lightclip.evaluation.stage import (
    WHOLE,
    EvaluateInputs,
    EvaluateOutputs,
    ModelEvaluation,
    check_model_dirs,
    evaluate_model,
    read_ranks,
    run_evaluate,
    sample_catalogue,
    score_embeddings,
    summarise,
)

__all__ = [
    "DIRECTIONS",
    "WHOLE",
    "KS",
    "EvaluateInputs",
    "EvaluateOutputs",
    "EvaluationError",
    "Embeddings",
    "ModelEvaluation",
    "Positives",
    "RatioInterval",
    "attribute_precision",
    "catalogue_positives",
    "check_model_dirs",
    "embed_images",
    "embed_pairs",
    "embed_split",
    "embed_texts",
    "evaluate_model",
    "evaluate_retrieval",
    "group_pairs",
    "image_content_groups",
    "inference",
    "item_recall_scores",
    "paired_ratio_interval",
    "ranks_per_direction",
    "recall_at_k",
    "retrieval_metrics",
    "retrieval_ranks",
    "read_ranks",
    "run_evaluate",
    "sample_catalogue",
    "score_embeddings",
    "summarise",
    "title_groups",
    "tokenize_checked",
]
