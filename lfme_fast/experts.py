"""``python -m lfme_fast.experts compare ...``: the experts-vs-one-model comparison (LFME Fig. 2).

The experts themselves live in :mod:`lfme_fast.recipes.experts`; this module keeps the documented
command and the names older scripts import.
"""

from lfme_fast.recipes.experts import (  # noqa: F401  (re-exported)
    EXPERT_KEYS,
    ExpertInfo,
    ExpertsConfig,
    compare_with_model,
    expert_subsets,
    label_map,
    load_experts,
    main,
    train_experts,
)

__all__ = ["EXPERT_KEYS", "ExpertInfo", "ExpertsConfig", "compare_with_model", "expert_subsets", "label_map",
           "load_experts", "main", "train_experts"]

if __name__ == "__main__":
    raise SystemExit(main())
