"""The feature dashboard (`python -m dictionary_learning dashboard`,
`dictionary_learning.dashboard`): its numbers against a plain forward hook and dense references, its
circuit-tracer feature files against circuit-tracer's schema, and the page in a real headless
Chromium."""

import gzip
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from dictionary_learning import AutoEncoder, AutoEncoderTopK, load_model, save_dictionary
from dictionary_learning.__main__ import main
from dictionary_learning.core_metrics import CORE_GROUPS
from dictionary_learning.dashboard import (
    feature_statistics,
    keep_smallest,
    logit_lens,
    parse_features,
    virtual_weight_connections,
)
from dictionary_learning.data import text_source
from dictionary_learning.models import hook

from ..helpers import CTX, hook_reference, make_suite, random_texts

# circuit-tracer's feature file (circuit_tracer/frontend/feature_models.py, `Model` and its
# `ExamplesQuantile`, `Example`), re-declared from its source: circuit-tracer itself is not a test
# dependency
SCHEMA = {"index": int, "transcoder_id": str, "examples_quantiles": list, "top_logits": list,
          "bottom_logits": list, "act_min": float, "act_max": float, "quantile_values": list,
          "histogram": list, "activation_frequency": float}
QUANTILE = {"quantile_name": str, "examples": list}
EXAMPLE = {"tokens_acts_list": list, "train_token_ind": int, "is_repeated_datapoint": bool,
           "tokens": list}
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def check_schema(feature):
    """Exactly circuit-tracer's keys with its types (ints accepted for floats, as pydantic does)."""
    def check(obj, schema):
        assert set(obj) == set(schema), f"keys {sorted(obj)} != {sorted(schema)}"
        for key, kind in schema.items():
            ok = ((isinstance(obj[key], (int, float)) and not isinstance(obj[key], bool))
                  if kind is float else (isinstance(obj[key], kind)
                                         and (kind is bool or not isinstance(obj[key], bool))))
            assert ok, f"{key}: {obj[key]!r} is not a {kind.__name__}"

    check(feature, SCHEMA)
    for values, kind in ((feature["top_logits"], str), (feature["bottom_logits"], str),
                         (feature["quantile_values"], float), (feature["histogram"], float)):
        assert all(isinstance(v, kind) for v in values)
    for quantile in feature["examples_quantiles"]:
        check(quantile, QUANTILE)
        for example in quantile["examples"]:
            check(example, EXAMPLE)
            assert len(example["tokens"]) == len(example["tokens_acts_list"])
            assert all(isinstance(t, str) for t in example["tokens"])
            assert 0 <= example["train_token_ind"] < len(example["tokens"])
    try:  # where circuit-tracer is installed, its own pydantic model too
        from circuit_tracer.frontend.feature_models import Model
    except ImportError:
        return
    Model.model_validate(feature)


def test_parse_features():
    assert parse_features(3, 10) == [0, 1, 2]
    assert parse_features("300", 10) == list(range(10))
    assert parse_features("all", 4) == [0, 1, 2, 3]
    assert parse_features("0-2,7, 5-6,1", 10) == [0, 1, 2, 7, 5, 6]
    with pytest.raises(ValueError, match=r"features must lie in \[0, 9\] .* got \[10, 11\]"):
        parse_features("8-11", 10)
    with pytest.raises(ValueError, match="runs backwards"):
        parse_features("5-2", 10)
    with pytest.raises(ValueError, match="a count, 'all', or indices and ranges"):
        parse_features("first", 10)
    with pytest.raises(ValueError, match="features must be a positive int, got 0"):
        parse_features(0, 10)


def test_renamed_options_name_their_new_names(tmp_path):
    """A feature's sources are the earlier features it reads ("upstream" means Marks'
    dictionary_learning in this package): the old option and type names fail naming the new ones;
    the command line's --upstream ends in its one-line error naming --source."""
    from dictionary_learning.dashboard import build_dashboard, dashboard, directions

    with pytest.raises(TypeError, match="upstream was renamed source;"):
        dashboard(tmp_path / "sae", upstream=tmp_path / "earlier")
    with pytest.raises(TypeError, match="upstream was renamed sources;"):
        build_dashboard(None, None, None, [], tmp_path / "out", upstream=None)
    with pytest.raises(TypeError, match="upstream was renamed source"):
        virtual_weight_connections(None, None, [0], "earlier", upstream=None)
    with pytest.raises(AttributeError, match="Upstream was renamed Sources"):
        directions.Upstream  # noqa: B018
    with pytest.raises(SystemExit) as exited:
        main(["dashboard", "--dictionary", str(tmp_path / "sae"), "--upstream", str(tmp_path)])
    assert exited.value.code == 2
    assert sorted(tmp_path.iterdir()) == []


def test_keep_smallest_keeps_each_features_smallest_keys():
    generator = torch.Generator().manual_seed(0)
    table = {"feature": torch.randint(5, (200,), generator=generator),
             "key": torch.rand(200, generator=generator)}
    table["payload"] = torch.arange(200)
    kept = keep_smallest(table, 3)
    for feature in range(5):
        mine = sorted(kept["key"][kept["feature"] == feature].tolist())
        reference = sorted(table["key"][table["feature"] == feature].tolist())[:3]
        assert mine == reference
    assert torch.equal(table["key"][kept["payload"]], kept["key"])  # rows stay whole


def test_statistics_match_a_plain_forward_hook(tiny_llama):
    """Density, maxima, the top-N values and every example's window of tokens and activations equal
    those of a plain PyTorch forward hook on each text alone, encoded densely."""
    model = tiny_llama
    point = hook(model, 1, "resid")
    torch.manual_seed(0)
    sae = AutoEncoder(64, 96)
    with torch.no_grad():
        sae.encoder.bias.zero_()  # each feature fires on about half the tokens
    sae = sae.to(next(model._module.parameters()).device)
    texts = random_texts(40, seed=3)
    features = [0, 5, 17, 40, 95]
    stats = feature_statistics(sae, model, point, iter(texts), features, tokens=10**6, ctx_len=CTX,
                               batch_texts=7, remove_bos=True, top_examples=6, sample_examples=8,
                               reservoir=16, progress=False)
    [reference] = hook_reference(model, texts, [point], CTX, drop_first=True)
    codes = sae.encode(reference.to(next(sae.parameters()).device)).float().cpu()[:, features]
    assert stats.tokens == reference.shape[0] and stats.texts == len(texts)
    torch.testing.assert_close(stats.density, (codes != 0).double().mean(dim=0))
    torch.testing.assert_close(stats.max_value, codes.max(dim=0).values.clamp_min(0))
    assert (stats.fired > 16).all()  # more activations than the reservoir holds
    for j in range(len(features)):
        mine = stats.top["value"][stats.top["feature"] == j].sort(descending=True).values
        torch.testing.assert_close(mine, codes[:, j].topk(6).values, rtol=1e-5, atol=1e-6)
        assert (stats.values["feature"] == j).sum() == min(16, int(stats.fired[j]))
    # each kept example: its window is a stretch of its text, with the activations the reference
    # gives there
    ids = [model.tokenizer(text, truncation=True, max_length=CTX)["input_ids"] for text in texts]
    per_text, start = [], 0
    for text_ids in ids:  # the reference codes per text, its first token (dropped) as 0
        rows = codes[start : start + len(text_ids) - 1]
        start += len(text_ids) - 1
        per_text.append(torch.cat([torch.zeros(1, len(features)), rows]))
    for table in (stats.top, stats.sample):
        for row in range(len(table["value"])):
            j, text = int(table["feature"][row]), int(table["text"][row])
            window = [int(t) for t in table["ids"][row] if t >= 0]
            acts = table["acts"][row][table["ids"][row] >= 0]
            starts = [o for o in range(len(ids[text]) - len(window) + 1)
                      if ids[text][o : o + len(window)] == window]
            assert any(torch.allclose(acts, per_text[text][o : o + len(window), j], atol=1e-5)
                       for o in starts)


def test_logit_lens_reads_through_the_final_norm(tiny_model):
    """The logit lens of a direction d equals (up to the norm's per-token scale) the model's own
    head on its final norm of d, less the head on the norm of 0 (its bias): for RMSNorm (Llama) and
    LayerNorm (GPT-2)."""
    module = tiny_model._module
    final_norm = module.model.norm if hasattr(module, "model") else module.transformer.ln_f
    width = module.lm_head.weight.shape[1]
    directions = (torch.randn(3, width, generator=torch.Generator().manual_seed(0))
                  .to(module.lm_head.weight.device))
    top_ids, top_values, bottom_ids, bottom_values = logit_lens(tiny_model, directions, n_tokens=5)
    with torch.no_grad():
        head = (module.lm_head(final_norm(directions))
                - module.lm_head(final_norm(torch.zeros_like(directions))))
        layer_norm = isinstance(final_norm, torch.nn.LayerNorm)
        centred = directions - directions.mean(-1, keepdim=True) if layer_norm else directions
        eps = final_norm.eps if layer_norm else final_norm.variance_epsilon
        # the norm's per-token scale is 1 / rms
        rms = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    expected = (head * rms).float().cpu()
    torch.testing.assert_close(top_values, expected.topk(5, dim=1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bottom_values, expected.topk(5, dim=1, largest=False).values,
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(top_ids, expected.topk(5, dim=1).indices)


def test_virtual_weights_against_a_dense_product():
    torch.manual_seed(0)
    earlier, later = AutoEncoder(64, 50), AutoEncoder(64, 30, transcoder=True)
    found = virtual_weight_connections(later, earlier, [3, 7], "earlier", n_connections=4, chunk=16)
    dense = later.encoder.weight.detach()[[3, 7]] @ earlier.decoder.weight.detach()  # [2, 50]
    for row, connections in zip(dense, found.connections):
        order = row.abs().argsort(descending=True)[:4]
        assert [(name, j) for name, j, _ in connections] == [("earlier", int(j)) for j in order]
        assert [w for _, _, w in connections] == pytest.approx(row[order].tolist(), rel=1e-5)


def external_references(html):
    """Script / style / link / image sources and CSS imports that leave the page."""
    found = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*""", html, re.I)
    found += re.findall(r"""url\(\s*["']?\s*(?:https?:)?//""", html, re.I)
    found += re.findall(r"@import", html, re.I)
    return found


def read_binary_feature(folder, layer, feature):
    """A feature as circuit-tracer's viewer reads the binary form its local server serves
    (--features_dir)."""
    index = json.loads(gzip.decompress((folder / "index.json.gz").read_bytes()))[str(layer)]
    data = (folder / index["filename"]).read_bytes()[index["offsets"][feature] :
                                                     index["offsets"][feature + 1]]
    [length] = struct.unpack("<I", data[:4])
    return json.loads(zlib.decompress(data[4 : 4 + length]))


def test_quickstart_and_the_dashboard_command(tmp_path):
    """The quickstart writes dashboard/index.html; the command on its SAE writes a page with no
    outside references and circuit-tracer feature files (both forms) whose density and maximum equal
    a plain forward hook's on the same texts."""
    metrics = main(["train", "--model", "tiny-llama", "--tokens", "400", "--steps", "3", "--batch",
                    "64", "--dict-size", "64", "--k", "4", "--eval-texts", "8", "--eval-tokens",
                    "128", "--ctx-len", "32", "--loss-batches", "1", "--n-features", "1",
                    "--dashboard-features", "10", "--out", str(tmp_path / "q")])
    assert ((tmp_path / "q" / "dashboard" / "index.html").exists()
            and metrics["seconds_dashboard"] > 0)
    assert len(list((tmp_path / "q" / "dashboard" / "features").glob("*.json"))) == 10
    # SAEBench's core groups and names
    core = json.loads((tmp_path / "q" / "saebench_core.json").read_text())
    assert (set(core) == set(CORE_GROUPS)
            and core["model_performance_preservation"]["ce_loss_score"] == metrics["ce_loss_score"])
    out = tmp_path / "dash"
    meta = main(["dashboard", "--dictionary", str(tmp_path / "q" / "sae" / "trainer_0"),
                 "--features", "0-11,40", "--tokens", "500", "--batch-texts", "5", "--dtype",
                 "float32", "--out", str(out)])
    assert meta["hook"] == "layers.2.resid" and meta["features"] == 13 and meta["tokens"] >= 500
    html = (out / "index.html").read_text()
    assert external_references(html) == []
    template = Path(__file__).parents[2] / "dictionary_learning" / "dashboard" / "template.html"
    assert "http" not in template.read_text()
    files = sorted(int(p.stem) for p in (out / "features").glob("*.json"))
    assert files == [*range(12), 40]
    model = load_model("tiny-llama", dtype=torch.float32)
    texts = [t for _, t in zip(range(meta["texts"]), text_source(None))]
    [reference] = hook_reference(model, texts, [hook(model, 2, "resid")], 32, drop_first=True)
    from dictionary_learning import load_dictionary

    sae, _ = load_dictionary(tmp_path / "q" / "sae" / "trainer_0")
    codes = sae.encode(reference)
    assert meta["tokens"] == reference.shape[0]
    for index in files:
        feature = json.loads((out / "features" / f"{index}.json").read_text())
        check_schema(feature)
        assert feature["index"] == index
        assert (feature["activation_frequency"]
                == pytest.approx((codes[:, index] != 0).float().mean().item()))
        assert feature["act_max"] == pytest.approx(codes[:, index].max().clamp_min(0).item(),
                                                   rel=1e-3)
        top = feature["examples_quantiles"][0]["examples"]
        if top:
            assert (top[0]["tokens_acts_list"][top[0]["train_token_ind"]]
                    == pytest.approx(feature["act_max"], rel=1e-3))
        assert read_binary_feature(out / "features", 2, index) == feature
    make_suite_folder(tmp_path / "s")
    with pytest.raises(ValueError, match="is a whole SCAE suite"):
        main(["dashboard", "--dictionary", str(tmp_path / "s" / "suite")])


def make_suite_folder(folder):
    from dictionary_learning.scae import all_connections

    model = load_model("tiny-llama", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    suite.model_name = "tiny-llama"
    suite.connections = all_connections(suite, model)
    suite.save(folder / "suite")
    return suite


def test_scae_module_shows_its_connections(tmp_path):
    """A suite module's page lists its selected connections: here all of them, so the
    strongest |weight| first, named by source module and feature."""
    suite = make_suite_folder(tmp_path)
    out = tmp_path / "dash"
    main(["dashboard", "--dictionary", str(tmp_path / "suite" / "mlp_1"), "--features", "4",
          "--tokens", "200", "--ctx-len", str(CTX), "--out", str(out)])
    html = (out / "index.html").read_text()
    data = json.loads(re.search(r'id="dashboard-data">(.*?)</script>', html, re.S).group(1))
    # [4, n_sources]: attn_0, mlp_0, attn_1 in order
    weights = suite.connections.weights["mlp_1"][:4]
    sizes = [("attn_0", 96), ("mlp_0", 96), ("attn_1", 96)]
    for feature in data["features"]:
        order = weights[feature["index"]].abs().argsort(descending=True)[:10].tolist()
        expected = [(sizes[i // 96][0], i % 96) for i in order]
        assert [(name, j) for name, j, _ in feature["sources"]] == expected
    assert "selected connections" in data["meta"]["sources"]
    assert data["meta"]["hook"] == "layers.1.mlp_in"


def launch_chromium():
    """Playwright and Debian's Chromium, or a skip saying which is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install -y --no-install-recommends "
                    "chromium)")
    return sync_playwright, executable


@pytest.mark.browser
def test_the_page_in_a_headless_browser(tmp_path):
    """From file://, with no console errors and no request but the page itself: search filters the
    list, and clicking a feature shows its contexts with highlighted tokens."""
    sync_playwright, executable = launch_chromium()
    torch.manual_seed(0)
    save_dictionary(AutoEncoderTopK(48, 40, 4), tmp_path / "sae", config={"trainer": {
        "lm_name": "tiny-gpt2", "layer": 1, "submodule_name": "layers.1.resid"}})
    main(["dashboard", "--dictionary", str(tmp_path / "sae"), "--tokens", "400", "--ctx-len", "32",
          "--out", str(tmp_path / "dash")])
    data = json.loads(re.search(r'id="dashboard-data">(.*?)</script>',
                                (tmp_path / "dash" / "index.html").read_text(), re.S).group(1))
    alive = [f for f in data["features"] if f["fired"] > 0]
    token = next(t.strip() for f in alive for t in f["top_tokens"]
                 if t.strip() and not t.strip().isdigit())
    with_token = {f["index"] for f in data["features"]
                  if any(token.lower() in t.lower() for t in f["top_tokens"])}
    errors, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda message: (errors.append(message.text)
                                                if message.type == "error" else None))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
            page.on("request", lambda request: requests.append(request.url))
            page.goto((tmp_path / "dash" / "index.html").as_uri())
            listed = lambda: {int(i) for i in page.eval_on_selector_all(  # noqa: E731
                "#feature-list li", "items => items.map(li => li.dataset.index)")}
            assert listed() == {f["index"] for f in data["features"]}
            page.fill("#search", "#7")
            assert listed() == {7}
            page.fill("#search", token)
            assert listed() == with_token
            page.fill("#search", "")
            page.click(f"li[data-index='{alive[0]['index']}']")
            page.wait_for_selector("#detail .example .token")
            assert page.inner_text("#detail h2").startswith(f"Feature {alive[0]['index']}")
            highlighted = page.eval_on_selector_all(
                "#detail .example .token",
                "spans => spans.filter(s => s.style.backgroundColor).length")
            assert highlighted > 0
            assert page.eval_on_selector("#detail svg.histogram",
                                         "svg => svg.querySelectorAll('rect').length") == 40
        finally:
            browser.close()
    assert errors == []
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
