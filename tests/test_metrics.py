"""The metric registry (lrc.measure.metrics): every LM metric reaches compare_lm's result and
eval's table; top-5 agreement checked against numpy; the tensor metrics are verify's,
layer drift's and agreement's, under one name each."""

import numpy as np
import pytest

from lrc.measure import quality as E
from lrc.present.quality import format_table
from test_evaluate import _text, lm, np_logits, tiny_tokenizer, write_lm  # noqa: F401


def test_every_registered_metric_is_reported_and_shown(lm):
    _, folder = lm
    res = E.compare_lm(folder, folder, _text(), context=32, max_tokens=300)
    assert set(E.LM_METRICS) <= set(res)
    assert res["top5_agreement"] == 1.0
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(format_table(res))
    shown = console.export_text()
    assert all(m.label in shown for m in E.LM_METRICS.values())


def test_top5_agreement_matches_numpy(lm, tmp_path):
    w, folder = lm
    u, s, vt = np.linalg.svd(w["W1"], full_matrices=False)
    new = write_lm(tmp_path / "lr", w, low_rank_w1=(u[:, :1] * s[:1], vt[:1]))
    res = E.compare_lm(folder, new, _text(), context=32, max_tokens=300)
    ids = tiny_tokenizer().encode(_text(), add_special_tokens=False).ids[:300]
    w_lr = dict(w, W1=(u[:, :1] * s[:1]) @ vt[:1])
    hits = []
    for s0 in range(0, len(ids) - 31 + 1, 31):
        seq = np.array([1] + ids[s0:s0 + 31])
        lo, ln = np_logits(w, seq)[:-1], np_logits(w_lr, seq)[:-1]
        top5 = np.argsort(-ln, axis=-1)[:, :5]
        hits.extend((top5 == lo.argmax(-1)[:, None]).any(-1))
    assert res["top5_agreement"] == pytest.approx(np.mean(hits))
    assert res["top1_agreement"] <= res["top5_agreement"] < 1.0


def test_a_new_metric_is_one_registry_entry(lm, monkeypatch):
    _, folder = lm
    from lrc.measure.metrics import Metric

    entropy = Metric("new_entropy", "entropy of new", "distribution", lambda lp_o, lp_n, lo, ln:
                     -(np.exp(lp_n) * lp_n).sum(-1, dtype=np.float64))
    monkeypatch.setitem(E.LM_METRICS, entropy.key, entropy)
    res = E.compare_lm(folder, folder, _text(), context=32, max_tokens=300)
    assert res["new_entropy"] > 0
