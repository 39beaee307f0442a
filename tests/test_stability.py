"""Clean-pair purity (pipeline/clustering/stability.py): the measure behind the clustering-stability table."""

import pandas as pd

from pipeline.clustering.stability import markdown, noisy_split, purity


def _world():
    truth = pd.DataFrame({
        "key": [f"k{i}" for i in range(10)],
        "split": ["train"] * 9 + ["new_domain"],
        "domain": ["a", "a", "a", "b", "b", "b", "a", "b", "a", "a"],
        "noise": ["clean"] * 6 + ["mismatch", "mismatch", "junk", "clean"],
        "caption_domain": ["a", "a", "a", "b", "b", "b", "b", "a", "junk", "a"],
    })
    # expert 0 holds a's clean pairs and one of b's; expert 1 the rest
    assigned = pd.DataFrame({"key": [f"k{i}" for i in range(10)],
                             "expert_id": [0, 0, 0, 0, 1, 1, 1, 0, 1, 1]})
    return assigned, truth


def test_purity_counts_clean_training_pairs_only():
    assigned, truth = _world()
    table = purity(assigned, truth)
    assert table["expert_id"].tolist() == [0, 1]
    assert table["domain"].tolist() == ["a", "b"]
    assert table["clean_pairs"].tolist() == [4, 2]       # k9 is not a training pair
    assert table["purity"].tolist() == [0.75, 1.0]


def test_noisy_pairs_are_said_to_follow_their_caption_or_their_image():
    assigned, truth = _world()
    split = noisy_split(assigned, truth, purity(assigned, truth))
    # k6 (image a, caption b) went to expert 1 (b), k7 (image b, caption a) to expert 0 (a)
    assert split["mismatch"] == {"pairs": 2, "with_caption_domain": 1.0, "with_image_domain": 0.0}
    assert split["junk"]["pairs"] == 1 and split["junk"]["with_caption_domain"] == 0.0


def test_the_table_names_the_minimum():
    assigned, truth = _world()
    table = purity(assigned, truth)
    result = {"rows": 10, "fine_k": 2, "num_experts": 2, "restarts": 1, "capacity_slack": 0.2,
              "coarse_restarts": 100,
              "seeds": [{"seed": s, "experts": table.to_dict("records"), "min_purity": 0.75,
                         "noisy": noisy_split(assigned, truth, table)} for s in (0, 1)],
              "min_purity": 0.75}
    text = markdown(result)
    assert "| 0 | a 0.750 | b 1.000 | 0.750 |" in text and "**0.750**" in text
    assert "- mismatch (2 pairs): 1.00 / 0.00" in text
