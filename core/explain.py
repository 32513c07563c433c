"""``graft explain``: what a finished model looks at, with attributions from Captum (Kokhlikyan et al. 2020, the
PyTorch library for them) and a faithfulness score for each one.

- images (classification; segmentation, per class): Integrated Gradients (Sundararajan et al. 2017; baseline = a
  zero input, i.e. the normalisation's mean colour), Grad-CAM (Selvaraju et al. 2017; Captum's ``LayerGradCam`` on
  the model's last feature map -- the last module whose output is a ``[B, C, h, w]`` map with h, w > 1, before a
  segmentation model's class maps -- upsampled bilinearly), occlusion (Zeiler & Fergus 2014; a square window of 1/8
  of the side sliding by half its size, replaced by zeros);
- text (classification; token classification, for one word's tag): Integrated Gradients on the embedding layer
  (``LayerIntegratedGradients``; baseline = the same sequence with every token but the tokenizer's special ones
  replaced by padding), summed per word (words = whitespace-separated spans of the text; a word's pieces add up);
- language models (clm, preference): one token of the greedy answer, attributed to the prompt's words the same way.

The explained function is the softmax probability of the target class (the predicted one unless ``target``; see
``explain_inputs`` for segmentation and tagging), on the exact input ``graft predict`` builds (the run's data source
encodes it). Faithfulness (Petsiuk et al. 2018, RISE):
the deletion curve removes the most-attributed pixels (words) first -- replaced by the baseline -- and tracks the
target probability; the insertion curve starts from the baseline and puts them back. Each curve's area (the mean
over 21 points from 0% to 100%) is given beside the same areas for random orders (the mean of 5 seeded
permutations): a faithful explanation deletes faster (lower deletion AUC) and inserts faster (higher insertion AUC)
than random. ``sanity``: the model-randomisation check (Adebayo et al. 2018) -- every layer re-initialised, the
explanation recomputed, and Spearman's rank correlation (scipy.stats) between the two given; a value near 1 says the
method shows the input, not what the model learned.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import GraftError, did_you_mean
from .files import atomic_write_text

METHODS = {"image": ("integrated_gradients", "gradcam", "occlusion"), "text": ("integrated_gradients",)}
TASKS = {"image": ("classification", "segmentation"), "text": ("classification", "token_classification")}
POINTS = 21  # of each deletion / insertion curve
RANDOM_ORDERS = 5


def _captum():
    try:
        import captum.attr as attr
    except ImportError:
        raise GraftError("graft explain uses Captum: pip install 'graftkit[explain]'.") from None
    return attr


def _pytorch(run) -> None:
    import torch

    if not isinstance(getattr(run, "model", None), torch.nn.Module):
        raise GraftError("graft explain needs the PyTorch model's gradients: give it the trained run directory, not an "
                         "ONNX export or compression.")


def _check(run, method: str, target: str) -> str:
    _pytorch(run)
    modality = run.backbone.modality
    task = getattr(run.data, "task", None)
    if task not in TASKS.get(modality, ()):
        raise GraftError(f"graft explain explains image classification and segmentation, text classification and "
                         f"token classification, and language models; this run's data has task {task!r} on a "
                         f"{modality} backbone.")
    method = method or "integrated_gradients"
    if method not in METHODS[modality]:
        raise GraftError(f"--method {method!r} is not one for {modality} runs; use one of "
                         f"{', '.join(METHODS[modality])}.{did_you_mean(method, list(METHODS[modality]))}")
    names = list(run.data.label_names)
    if target and target not in names:
        raise GraftError(f"--target {target!r} is not one of this run's labels ({', '.join(names)})."
                         f"{did_you_mean(target, names)}")
    return method


def explain(run, items: list[str], method: str = "", target: str = "", steps: int = 50, sanity: bool = False,
            seed: int = 0, token: int = 0, layer: str = "") -> list[dict]:
    """One record per item (an image path or a text, as ``graft predict`` takes them): predicted and target label
    and probability, the attributions (``heat``: a ``[H, W]`` array for images; ``words``: [(word, attribution)]
    for text), the method's convergence delta (Integrated Gradients), deletion / insertion AUCs against random
    order, and with ``sanity`` Spearman's rho against a re-initialised model. A language-model run (clm, preference):
    ``explain_decoder`` for each prompt, its ``token``-th generated token. Raises GraftError for a run that is neither,
    an unknown method or target label (with the labels), or an input of the wrong modality."""
    from .generate import CausalGeneration

    _pytorch(run)
    if isinstance(run.strategy, CausalGeneration):
        if method and method != "integrated_gradients" or target:
            raise GraftError("A language-model run is explained with integrated_gradients for one generated token "
                             "(--token K); --method and --target are for classifiers.")
        return [{"input": item, **explain_decoder(run, item, token, steps, seed)} for item in items]
    method = _check(run, method, target)
    out = []
    for item in items:
        if run.backbone.modality == "image" and not Path(item).is_file():
            raise GraftError(f"{item!r} is not an image file, and this run takes images: pass image paths.")
        record = explain_inputs(run, run.data.encode(run.backbone, [item]), item, method, target, steps, sanity, seed,
                                token, layer)
        out.append({"input": item, **record})
    return out


def explain_inputs(run, inputs, text: str | None, method: str, target: str = "", steps: int = 50,
                   sanity: bool = False, seed: int = 0, token: int = 0, layer: str = "") -> dict:
    """The record of one encoded input (a batch of one, as the run's data source makes it); ``text``: the text it
    encodes (words are read from it; None: from the decoded tokens). What is explained: classification, the
    target's probability; segmentation, the target's mean probability over the pixels predicted as it (default
    target: the class covering most pixels, "background" last); token classification, the target tag's probability
    at word ``token`` (default: its predicted tag)."""
    import torch

    model = run.model.eval()
    names, task = list(run.data.label_names), run.data.task
    if isinstance(inputs, dict) and "images" in inputs:  # segfolder's: the images, and sizes the masks go back to
        inputs = inputs["images"]
    inputs = inputs.to(run.device) if torch.is_tensor(inputs) else {k: v.to(run.device) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(inputs).float()
    record = {"method": method}
    if task == "segmentation":
        pred = logits[0].argmax(0)
        counts = torch.bincount(pred.flatten(), minlength=len(names))
        order = [int(k) for k in counts.argsort(descending=True) if counts[k] > 0]
        t = names.index(target) if target else sorted(order, key=lambda k: names[k] == "background")[0]
        region = (pred == t).float() if (pred == t).any() else torch.ones_like(pred, dtype=torch.float32)
        select = lambda z: (torch.softmax(z, 1)[:, t] * region).sum((1, 2)) / region.sum()  # noqa: E731
        record.update(pixels=float((pred == t).float().mean()))
    elif task == "token_classification":
        where = (inputs["word_ids"][0] == token).nonzero().flatten()
        if where.numel() == 0:
            raise GraftError(f"--token {token}: the input has {int(inputs['word_ids'][0].max()) + 1} word(s) within "
                             f"the model's length (counted from 0).")
        pos = int(where[0])  # a word's tag is read at its first piece, as graft predict does
        t = names.index(target) if target else int(logits[0, pos].argmax())
        select = lambda z: torch.softmax(z[:, pos], -1)[:, t]  # noqa: E731
        record.update(token=token, word=(text or "").split()[token] if text else None)
    else:
        t = names.index(target) if target else int(logits[0].argmax())
        select = lambda z: torch.softmax(z, 1)[:, t]  # noqa: E731
    wrap = None if torch.is_tensor(inputs) else (lambda i, m: {"input_ids": i, "attention_mask": m})

    def goal(m):  # the explained number, as a function of the model's input (text: ids and mask)
        return lambda x, *extra: select(m(wrap(x, *extra) if wrap else x).float())

    with torch.no_grad():
        p = float(goal(model)(*((inputs,) if wrap is None else (inputs["input_ids"], inputs["attention_mask"])))[0])
    if task == "segmentation":  # the explained class is the one shown
        predicted, probability = t, p
    else:
        probs = torch.softmax(logits[0, pos] if task == "token_classification" else logits[0], -1)
        predicted, probability = int(probs.argmax()), float(probs.max())
    record.update(predicted=names[predicted], probability=probability, target=names[t], target_probability=p)
    explainer = _image if run.backbone.modality == "image" else _text
    record.update(explainer(run, model, inputs, text, goal, method, steps, seed, layer))
    if sanity:
        record["sanity_spearman"] = _sanity(run, model, inputs, text, goal, method, steps, seed, record, layer)
    return record


def explain_split(run, split: str, limit: int, method: str = "", steps: int = 50, seed: int = 0,
                  layer: str = "") -> dict:
    """``limit`` examples of ``split`` (a run loaded with its data; a sample seeded by ``seed``), each explained for
    its true label.
    Returns {"records": [...], "classes": {label: summary}}: for text the words with the largest mean attribution
    per class (over the examples of that class; a word counted once per example), for images the most and least
    confident examples per class."""
    method = _check(run, method, "")
    if run.data.task != "classification":
        raise GraftError(f"--split: a report over a split is for classifiers (one label per example); this run's task "
                         f"is {run.data.task!r}. Explain its inputs one by one instead.")
    data = run.data.dataset(split)
    if not data:
        raise GraftError(f"--split {split}: this run's data has no {split} split.")
    import numpy as np

    names, records = list(run.data.label_names), []
    tok = run.backbone.tokenizer() if run.backbone.modality == "text" else None
    # a seeded sample, in the split's order: a split stored class by class still shows every class
    for i in sorted(np.random.default_rng(seed).permutation(len(data))[:limit].tolist()):
        batch = run.data.collate([data[i]])
        label = names[int(batch["targets"][0])]
        text = None if tok is None else tok.decode(batch["inputs"]["input_ids"][0], skip_special_tokens=True)
        records.append({"example": i, "label": label,
                        **explain_inputs(run, batch["inputs"], text, method, label, steps, False, seed, 0, layer)})
    classes = {}
    for name in names:
        mine = [r for r in records if r["label"] == name]
        if not mine:
            continue
        if tok is not None:
            sums: dict[str, list[float]] = {}
            for r in mine:
                for w, v in dict(r["words"]).items():
                    sums.setdefault(w, []).append(v)
            top = sorted(((w, sum(v) / len(v), len(v)) for w, v in sums.items()), key=lambda x: -x[1])[:10]
            classes[name] = {"examples": len(mine), "top_words": [{"word": w, "mean_attribution": m, "examples": n}
                                                                  for w, m, n in top]}
        else:
            ranked = sorted(mine, key=lambda r: -r["target_probability"])
            classes[name] = {"examples": len(mine), "most_confident": [r["example"] for r in ranked[:3]],
                             "least_confident": [r["example"] for r in ranked[3:][-3:][::-1]]}
    aucs = {k: sum(r[k] for r in records if k in r) / max(1, sum(k in r for r in records))
            for k in ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random")}
    return {"split": split, "method": method, "examples": len(records), "mean": aucs, "classes": classes,
            "records": records}


def explain_decoder(run, prompt: str, token: int = 0, steps: int = 50, seed: int = 0) -> dict:
    """A language-model run's greedy answer to ``prompt`` (in the run's instruction template, as graft generate
    wraps it) and the attribution of its ``token``-th token's probability to the words of the prompt: Integrated
    Gradients on the embedding layer, baseline = the prompt's tokens replaced by padding (the template's special
    tokens and the answer's earlier tokens kept). Deletion / insertion remove (put back) prompt words. Raises
    GraftError when the answer has no ``token``-th token."""
    import torch

    attr = _captum()
    model, tok, strategy = run.model.eval(), run.backbone.tokenizer(), run.strategy
    text, special, _ = (run.data.prompt_text(tok, prompt) if hasattr(run.data, "prompt_text")
                        else (prompt, True, ""))
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]], device=run.device)
    stops = strategy.stop_ids(model, tok)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=token + 1, pad_token_id=strategy._pad_id(tok), eos_token_id=stops)
    answer = out[0, ids.shape[1]:]
    if answer.numel() <= token:
        raise GraftError(f"--token {token}: the answer to {prompt!r} has only {answer.numel()} token(s).")
    chosen = int(answer[token])
    seq = out[:, :ids.shape[1] + token]  # the prompt and the answer before the explained token
    pad = strategy._pad_id(tok)
    start = text.find(prompt) if isinstance(prompt, str) else -1
    span = (start, start + len(prompt)) if start >= 0 else (0, len(text))
    in_prompt = torch.zeros(seq.shape[1], dtype=torch.bool)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        in_prompt[i] = b > a and span[0] <= a < span[1]
    base = torch.where(in_prompt.to(seq.device)[None], torch.full_like(seq, pad), seq)

    def f(x):
        return torch.softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].float(), -1)[:, chosen]

    layer = _embedding_layer(lambda inputs: model(input_ids=inputs["input_ids"]), {"input_ids": seq}, model)
    a, delta = attr.LayerIntegratedGradients(f, layer).attribute(seq, baselines=base, n_steps=steps,
                                                                 return_convergence_delta=True)
    per_token = a.sum(-1)[0].detach().float().cpu()
    spans = [(m.start() + span[0], m.end() + span[0], m.group()) for m in re.finditer(r"\S+", text[span[0]:span[1]])]
    words = {}
    for i, (s0, e0) in enumerate(enc["offset_mapping"]):
        if in_prompt[i]:
            k = next((k for k, (a0, b0, _) in enumerate(spans) if a0 < e0 and s0 < b0), None)  # " word" overlaps
            if k is not None:
                words.setdefault(k, []).append(i)
    words = [(spans[k][2], pos) for k, pos in sorted(words.items())]
    scores = torch.tensor([float(per_token[pos].sum()) for _, pos in words])

    def curves(order):
        deleted, inserted = _word_steps(order, words, seq, base, pad)
        with torch.no_grad():
            return f(deleted).cpu(), f(inserted).cpu()

    with torch.no_grad():
        p = float(f(seq)[0])
    record = {"method": "integrated_gradients", "answer": tok.decode(answer, skip_special_tokens=True),
              "token": token, "explained": tok.decode([chosen]), "probability": p,
              "convergence_delta": float(delta.abs().max()),
              "words": [(w, float(v)) for (w, _), v in zip(words, scores)]}
    record.update(_faithfulness(curves, scores, seed) if words else {})
    return record


def _named_layer(model, name: str):
    """``--layer NAME``: the module of that name (as ``model.named_modules()`` gives it) for Grad-CAM."""
    names = dict(model.named_modules())
    if name not in names:
        maps = [n for n in names if n.count(".") <= 3]
        raise GraftError(f"--layer {name!r} is not a module of this model.{did_you_mean(name, list(names))} Its "
                         f"modules are named like {', '.join(maps[-6:])}.")
    return names[name]


def _last_feature_map(model, x):
    """The last module (in execution order) whose output is a ``[B, C, h, w]`` map with h, w > 1 -- for a
    segmentation model, the last before its class maps (the decoder's fused features, as Seg-Grad-CAM, Vinogradova
    et al. 2020, takes a decoder layer)."""
    import torch

    seen, hooks = [], []
    for module in model.modules():
        hooks.append(module.register_forward_hook(
            lambda m, i, o: seen.append((m, o.shape[1])) if torch.is_tensor(o) and o.ndim == 4
            and min(o.shape[-2:]) > 1 else None))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    if out.ndim == 4:
        while seen and seen[-1][1] == out.shape[1]:
            seen.pop()
    if not seen:
        raise GraftError("--method gradcam needs a convolutional feature map, and this backbone has none (a "
                         "transformer's patch tokens): use integrated_gradients or occlusion.")
    return seen[-1][0]


def _image(run, model, x, item, goal, method, steps, seed, layer="") -> dict:
    import torch

    attr = _captum()
    f = goal(model)
    base = torch.zeros_like(x)
    out = {}
    if method == "integrated_gradients":
        a, delta = attr.IntegratedGradients(f).attribute(x, baselines=base, n_steps=steps,
                                                          return_convergence_delta=True)
        out["convergence_delta"] = float(delta.abs().max())
        heat = a.sum(1)[0]
    elif method == "gradcam":
        module = _named_layer(model, layer) if layer else _last_feature_map(model, x)
        a = attr.LayerGradCam(f, module).attribute(x, relu_attributions=True)
        heat = attr.LayerAttribution.interpolate(a, tuple(x.shape[-2:]), "bilinear")[0, 0]
    else:
        side = max(1, min(x.shape[-2:]) // 8)
        a = attr.Occlusion(f).attribute(x, sliding_window_shapes=(x.shape[1], side, side),
                                        strides=(x.shape[1], max(1, side // 2), max(1, side // 2)), baselines=0)
        heat = a.sum(1)[0]
    heat = heat.detach().float().cpu()
    flat = x.reshape(x.shape[0], x.shape[1], -1)

    def curves(order):  # deletion and insertion of pixels in ``order``, one batch of POINTS inputs each
        counts = [round(k * order.numel() / (POINTS - 1)) for k in range(POINTS)]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        removed = torch.stack([(rank < n).to(x.device) for n in counts])[:, None, :]  # [POINTS, 1, H*W]
        deleted = torch.where(removed, torch.zeros_like(flat), flat).reshape(POINTS, *x.shape[1:])
        inserted = torch.where(removed, flat, torch.zeros_like(flat)).reshape(POINTS, *x.shape[1:])
        with torch.no_grad():
            return f(deleted).float().cpu(), f(inserted).float().cpu()

    out.update(_faithfulness(curves, heat.flatten(), seed))
    out["heat"], out["display"] = heat, display_image(x)
    return out


def _embedding_layer(model, inputs, modules=None):
    """The embedding module (of ``modules``, default ``model``) that receives the input ids when ``model(inputs)``
    runs."""
    import torch

    ids = inputs["input_ids"]

    def takes_ids(args):  # the ids themselves or a view of them (GPT-2 flattens them first)
        return bool(args) and torch.is_tensor(args[0]) and args[0].numel() == ids.numel() \
            and torch.equal(args[0].reshape(ids.shape), ids)

    found, hooks = [], []
    for module in (modules or model).modules():
        if isinstance(module, torch.nn.Embedding):
            hooks.append(module.register_forward_hook(lambda m, i, o: found.append(m) if takes_ids(i) else None))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    if not found:
        raise GraftError("graft explain found no embedding layer that takes this run's token ids.")
    return found[0]


def _words(run, item: str | None, ids) -> list[tuple[str, list[int]]]:
    """(word, its token positions) for each whitespace-separated word of ``item`` that the model's input holds;
    each token its own "word" when the tokenizer alone does not give the model's input ids back."""
    tok = run.backbone.tokenizer()
    item = item if item is not None else tok.decode(ids[0], skip_special_tokens=True)
    enc = tok(item, truncation=True, max_length=ids.shape[1], return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids[0].tolist():
        special = set(tok.all_special_ids)
        return [(tok.convert_ids_to_tokens(int(t)), [i]) for i, t in enumerate(ids[0].tolist()) if t not in special]
    spans = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", item)]
    words = {}
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if e <= s:  # special tokens ([CLS], [SEP], padding) belong to no word
            continue
        for k, (a, b, _) in enumerate(spans):
            if a < e and s < b:  # overlap: a byte-level BPE token holds the space before its word
                words.setdefault(k, []).append(i)
                break
    return [(spans[k][2], pos) for k, pos in sorted(words.items())]


def _text(run, model, inputs, item, goal, method, steps, seed, layer="") -> dict:
    import torch

    attr = _captum()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tok = run.backbone.tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    keep = set(tok.all_special_ids)
    special = torch.tensor([i in keep for i in ids[0].tolist()], device=ids.device)
    base = torch.where(special, ids, torch.full_like(ids, pad))
    f = goal(model)
    layer = _embedding_layer(model, inputs)
    a, delta = attr.LayerIntegratedGradients(f, layer).attribute(
        ids, baselines=base, additional_forward_args=(mask,), n_steps=steps, return_convergence_delta=True)
    per_token = a.sum(-1)[0].detach().float().cpu()
    if "word_ids" in inputs and item is not None:  # a tagger's input: its words are the text's, split at spaces
        split = item.split()
        words = [(w, pos) for k, w in enumerate(split)
                 if (pos := (inputs["word_ids"][0] == k).nonzero().flatten().tolist())]
    else:
        words = _words(run, item, ids)
    scores = torch.tensor([float(per_token[pos].sum()) for _, pos in words])

    def curves(order):
        deleted, inserted = _word_steps(order, words, ids, base, pad)
        m = mask.repeat(POINTS, 1)
        with torch.no_grad():
            return f(deleted, m).float().cpu(), f(inserted, m).float().cpu()

    out = {"convergence_delta": float(delta.abs().max()),
           "tokens": [(tok.convert_ids_to_tokens(int(i)), float(s)) for i, s in zip(ids[0], per_token)],
           "words": [(w, float(s)) for (w, _), s in zip(words, scores)]}
    out.update(_faithfulness(curves, scores, seed) if len(words) else {})
    return out


def _word_steps(order, words, ids, base, pad):
    """The POINTS inputs of a deletion curve (``ids`` with more and more words, most attributed first in ``order``,
    set to ``pad``) and of an insertion curve (``base`` with those words put back); ``words``: (word, positions)."""
    import torch

    counts = [round(k * order.numel() / (POINTS - 1)) for k in range(POINTS)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    deleted, inserted = ids.repeat(POINTS, 1), base.repeat(POINTS, 1)
    for row, n in enumerate(counts):
        for k in (rank < n).nonzero().flatten().tolist():
            deleted[row, words[k][1]] = pad
            inserted[row, words[k][1]] = ids[0, words[k][1]]
    return deleted, inserted


def _faithfulness(curves, scores, seed: int) -> dict:
    """Deletion / insertion AUCs (mean of the curve over its POINTS) of ``scores``' order, most attributed first,
    and of RANDOM_ORDERS seeded random orders (their mean)."""
    import torch

    deletion, insertion = curves(scores.argsort(descending=True))
    g = torch.Generator().manual_seed(seed)
    random = [curves(torch.randperm(scores.numel(), generator=g)) for _ in range(RANDOM_ORDERS)]
    return {"deletion_auc": float(deletion.mean()), "insertion_auc": float(insertion.mean()),
            "deletion_auc_random": sum(float(d.mean()) for d, _ in random) / RANDOM_ORDERS,
            "insertion_auc_random": sum(float(i.mean()) for _, i in random) / RANDOM_ORDERS,
            "deletion_curve": deletion.tolist(), "insertion_curve": insertion.tolist()}


def _sanity(run, model, inputs, item, goal, method, steps, seed, record, layer="") -> float:
    """Spearman's rho between this explanation and the same method's on the model with every layer re-initialised
    (seeded); the model itself is left as it was."""
    import copy
    import warnings

    import torch
    from scipy.stats import spearmanr

    random_model = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in random_model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    explainer = _image if run.backbone.modality == "image" else _text
    other = explainer(run, random_model, inputs, item, goal, method, steps, seed, layer)
    if "heat" in record:
        a, b = record["heat"].flatten(), other["heat"].flatten()
    else:
        a, b = [s for _, s in record["words"]], [s for _, s in other["words"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant map (Grad-CAM of a random model is often all 0): no rho
        rho = spearmanr(a, b).statistic
    return float(rho) if rho == rho else 0.0  # a constant map has no rank correlation


def write_image(record: dict, x_display, path: Path) -> None:
    """A PNG: the model's input beside the heatmap over it, the labels in the title and the faithfulness figures
    below (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = record["heat"].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.8))
    for ax in axes:
        ax.imshow(x_display, cmap="gray" if x_display.ndim == 2 else None)
        ax.axis("off")
    axes[1].imshow(heat, alpha=0.6, **_colours(heat))
    fig.suptitle(f"predicted {record['predicted']} ({record['probability']:.2f}) - target {record['target']} "
                 f"({record['target_probability']:.2f}) - {record['method']}", fontsize=9)
    if "deletion_auc" in record:
        fig.text(0.5, 0.02, f"deletion AUC {record['deletion_auc']:.3f} (random {record['deletion_auc_random']:.3f}, "
                            f"lower is better) - insertion AUC {record['insertion_auc']:.3f} (random "
                            f"{record['insertion_auc_random']:.3f}, higher is better)", ha="center", fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _colours(heat) -> dict:
    """imshow's colours for a heatmap: red for and blue against, centred on 0, when it has both signs; a sequential
    map from 0 when it has one (Grad-CAM's ReLU map, a non-negative occlusion map)."""
    lo, hi = float(heat.min()), float(heat.max())
    if lo >= 0:
        return {"cmap": "inferno", "vmin": 0.0, "vmax": hi or 1.0}
    limit = max(-lo, hi) or 1.0
    return {"cmap": "bwr", "vmin": -limit, "vmax": limit}


def display_image(x):
    """The model's input ``[1, C, H, W]`` scaled to [0, 1] per channel for display (what the model sees)."""
    v = x[0].detach().float().cpu()
    lo, hi = v.amin((1, 2), keepdim=True), v.amax((1, 2), keepdim=True)
    v = (v - lo) / (hi - lo).clamp_min(1e-8)
    return v[0].numpy() if v.shape[0] == 1 else v[:3].permute(1, 2, 0).numpy()


def colour_words(words: list[tuple[str, float]], html: bool = False) -> str:
    """Words coloured by attribution: red for the target, blue against, stronger as |attribution| grows (ANSI
    escapes for a terminal, or HTML spans)."""
    limit = max((abs(s) for _, s in words), default=0.0) or 1.0
    out = []
    for w, s in words:
        level = min(1.0, abs(s) / limit)
        if html:
            from html import escape

            rgb = (255, int(255 * (1 - level)), int(255 * (1 - level))) if s > 0 else \
                (int(255 * (1 - level)), int(255 * (1 - level)), 255)
            out.append(f'<span title="{s:.4f}" style="background: rgb{rgb}">{escape(w)}</span>')
        else:
            shade = 16 + 36 * 5 + 6 * int(5 * (1 - level)) + int(5 * (1 - level)) if s > 0 else \
                16 + 36 * int(5 * (1 - level)) + 6 * int(5 * (1 - level)) + 5
            out.append(f"\x1b[48;5;{shade}m\x1b[30m{w}\x1b[0m")
    return " ".join(out)


def write_report(records: list[dict], out: Path) -> list[dict]:
    """PNGs for images (``NAME.METHOD.png``) and one HTML page for text (``explanations.html``) under ``out``;
    returns the records as JSON-ready dicts (the heatmap replaced by its file)."""
    out.mkdir(parents=True, exist_ok=True)
    plain, rows = [], []
    for i, r in enumerate(records):
        r = dict(r)
        if "heat" in r:
            path = out / f"{Path(r['input']).stem}.{r['method']}.png"
            if path.exists() and any(p.get("heatmap") == str(path) for p in plain):
                path = out / f"{Path(r['input']).stem}-{i}.{r['method']}.png"
            write_image(r, r.pop("display"), path)
            r.pop("heat")
            r["heatmap"] = str(path)
        else:
            auc = {k: r.get(k, float("nan")) for k in ("deletion_auc", "deletion_auc_random", "insertion_auc",
                                                         "insertion_auc_random")}
            from html import escape

            said = (f"answer {escape(r['answer'])!r}, token {r['token']} <b>{escape(r['explained'])}</b> "
                    f"({r['probability']:.2f})" if "answer" in r else
                    f"<b>{escape(r['predicted'])}</b> ({r['probability']:.2f}), target <b>{escape(r['target'])}</b>")
            rows.append(f"<p>{said}: {colour_words(r['words'], html=True)}<br><small>deletion AUC "
                        f"{auc['deletion_auc']:.3f} "
                        f"(random {auc['deletion_auc_random']:.3f}), insertion AUC {auc['insertion_auc']:.3f} (random "
                        f"{auc['insertion_auc_random']:.3f})</small></p>")
        plain.append(r)
    if rows:
        page = out / "explanations.html"
        atomic_write_text(page, "<!doctype html><meta charset=utf-8><title>graft explain</title><body "
                                "style='font-family: sans-serif'>" + "\n".join(rows) + "</body>\n")
        for r in plain:
            r["page"] = str(page)
    return plain


def write_split_report(report: dict, out: Path) -> dict:
    """``report.json`` (numbers only) under ``out``, and ``report.png`` (images: per class, its most and least
    confident examples with their heatmaps) or ``report.html`` (text: per class, the words of largest mean
    attribution, then every example's words coloured). Returns the JSON-ready report."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    by_example = {r["example"]: r for r in report["records"]}
    if any("heat" in r for r in report["records"]):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [(name, c["most_confident"] + c["least_confident"]) for name, c in report["classes"].items()]
        cols = max(len(ids) for _, ids in rows)
        fig, axes = plt.subplots(len(rows), cols, figsize=(1.8 * cols, 2.0 * len(rows)), squeeze=False)
        for (name, ids), line in zip(rows, axes):
            for ax in line:
                ax.axis("off")
            for ax, i in zip(line, ids):
                r = by_example[i]
                heat = r["heat"].numpy()
                ax.imshow(r["display"], cmap="gray" if r["display"].ndim == 2 else None)
                ax.imshow(heat, alpha=0.6, **_colours(heat))
                ax.set_title(f"{name} #{i}: p={r['target_probability']:.2f}", fontsize=7)
        fig.suptitle(f"{report['split']}: {report['method']}, most then least confident per class", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(out / "report.png", dpi=100)
        plt.close(fig)
    else:
        from html import escape

        parts = [f"<h1>{escape(report['split'])}: {escape(report['method'])}</h1>"]
        for name, c in report["classes"].items():
            words = ", ".join(f"{escape(w['word'])} ({w['mean_attribution']:.3f})" for w in c["top_words"])
            parts.append(f"<h2>{escape(name)} ({c['examples']} examples)</h2><p>largest mean attribution: {words}</p>")
        parts += [f"<p>#{r['example']} {escape(r['label'])} (p={r['target_probability']:.2f}): "
                  f"{colour_words(r['words'], html=True)}</p>" for r in report["records"]]
        atomic_write_text(out / "report.html", "<!doctype html><meta charset=utf-8><title>graft explain report"
                                               "</title><body style='font-family: sans-serif'>" + "\n".join(parts)
                                               + "</body>\n")
    plain = {**report, "records": [{k: v for k, v in r.items() if k not in ("heat", "display")}
                                   for r in report["records"]]}
    atomic_write_text(out / "report.json", json.dumps(plain, indent=2))  # last: there means the report is whole
    return plain
