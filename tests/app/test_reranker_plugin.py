"""A reranker is a plugin: one registry entry, registered at run time, and eval.py (its help,
its pipelines, results.json), `sj.search`, the REST API and the page's menu offer it with no
other edit (issue 30)."""
import json

import numpy as np
import pytest


def test_a_toy_reranker_in_search_rest_and_the_page(toy, searcher, capsys):
    import pytest
    from fastapi.testclient import TestClient

    from scvnet_jax.app import cli, server

    with pytest.raises(SystemExit):             # scvnet-search query --help
        cli.main(["query", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert f"chamfer, spatial, {toy}" in said and f"cvnet, csa, ames, chamfer, spatial and {toy} re-order" in said

    query = searcher.index.paths[4]
    plain = searcher.index.search(searcher.model, query, k=4)[0]
    hits = searcher.index.search(searcher.model, query, k=4, rerank=toy, rerank_k=3,
                                 options={"scale": 2.0})[0]
    # rerank_k 3 raised to k 4 (its scores have a scale of their own): the top 4 reversed
    assert [h.path for h in hits] == [h.path for h in plain][::-1]
    assert [h.score for h in hits] == [8.0, 6.0, 4.0, 2.0]

    client = TestClient(server.create_app(searcher))
    assert toy in client.get("/api/health").json()["rerankers"]
    assert f'<option value="{toy}">{toy}</option>' in client.get("/").text
    first = client.post("/api/search", params={"id": 4, "k": 4}).json()["hits"]
    r = client.post("/api/search", params={"id": 4, "k": 4, "rerank": toy, "rerank_k": 3})
    assert r.status_code == 200, r.text
    assert [h["path"] for h in r.json()["hits"]] == [h["path"] for h in first][::-1]
    assert r.json()["score_kind"].startswith(f"{toy}: n x scale")


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_a_toy_reranker_in_eval(toy, tmp_path, capsys, eval_main, demo_benchmark):
    assert eval_main("--help") == 0
    out = capsys.readouterr().out
    assert toy in out.split("--pipelines:")[1].split("--")[0]       # a pipeline
    assert f"{toy}.n = 3: how many to reverse; an integer >= 1" in out

    assert eval_main("--dataset", "demo", "--data_dir", demo_benchmark, "--cache_dir",
                     tmp_path / "cache", "--output", tmp_path / "r.json", "--first_stage",
                     "cvnet_global", "--pipelines", f"cvnet_global,{toy}",
                     f"--config.{toy}.n=5") == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res[toy]["options"] == {"n": 5, "scale": 1.0}
    assert res[toy]["first_stage"] == "cvnet_global"
    ranks = np.load(tmp_path / "r_ranks.npz")
    first, toyed = ranks["cvnet_global"], ranks[toy]
    np.testing.assert_array_equal(toyed[:5], first[:5][::-1])
    np.testing.assert_array_equal(toyed[5:], first[5:])
