"""Zero-shot evaluation as the PMG-AFT / HPT-GPD code does it: the per-dataset prompts (urda_fast.hpt.prompts), each
rule against prompts written out by hand from TeCoA's replaced torchvision dataset files, their attachment to opened
sets, `hpt eval` scoring a set with them (--prompts code) or with the templates (--prompts template); and the CW
attack's margin."""

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from urda_fast.hpt import data
from urda_fast.hpt.clip_models import load_clip
from urda_fast.hpt.data import ZeroShotSet
from urda_fast.hpt.prompts import FLOWERS102_NAMES, code_prompts


def test_each_rule_gives_the_files_prompts():
    assert code_prompts("food101", ["apple_pie", "beef_tartare"]) == [
        "A photo of apple pie, a type of food.", "A photo of beef tartare, a type of food."]
    assert code_prompts("pets", ["Abyssinian", "American Bulldog"]) == [
        "A photo of a abyssinian, a type of pet.", "A photo of a american bulldog, a type of pet."]
    assert code_prompts("dtd", ["banded", "polka-dotted"]) == [
        "A surface with a banded texture.", "A surface with a polka dotted texture."]
    # Boeing's numbered variants get the maker; '-' and '/' stay (the file replaces only '_')
    assert code_prompts("aircraft", ["707-320", "F-16A/B", "A300B4"]) == [
        "A photo of a boeing 707-320, a type of aircraft.", "A photo of a f-16a/b, a type of aircraft.",
        "A photo of a a300b4, a type of aircraft."]
    assert code_prompts("cars", ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012"]) == [
        "A photo of a am general hummer suv.", "A photo of a ram c/v cargo van minivan."]
    assert code_prompts("caltech256", ["001.ak47", "253.faces-easy-101", "257.clutter"]) == [
        "A photo of a ak47.", "A photo of a faces easy.", "A photo of a clutter."]
    assert code_prompts("caltech101", ["Faces_easy", "accordion"]) == [
        "A photo of a faces easy.", "A photo of a accordion."]
    flowers = code_prompts("flowers102", range(102))
    assert len(flowers) == 102 and flowers[0] == "A photo of a pink primrose, a type of flower."
    assert flowers[87] == "A photo of a cyclamen , a type of flower."  # the file's stray space, kept
    assert flowers[59] == "A photo of a pink yellow dahlia?, a type of flower."
    eurosat = code_prompts("eurosat", range(10))
    assert eurosat[1] == "A centered satellite photo of a forest." and \
        eurosat[9] == "A centered satellite photo of a sea or a lake."
    assert code_prompts("pcam", ["a", "b"]) == ["Tthis is a photo of healthy lymph node tissue.",
                                                "This is a photo of lymph node tumor tissue."]
    for name in ("cifar10", "cifar100", "stl10", "sun397", "imagenet", "folder:x"):
        assert code_prompts(name, ["cat"]) is None  # the template's sets
    assert len(FLOWERS102_NAMES) == 102


def test_a_release_with_other_classes_is_refused():
    with pytest.raises(ValueError, match="flowers102 has 101 classes, but the code's prompts are for 102.*"
                                         "--prompts template"):
        code_prompts("flowers102", range(101))


def test_opened_sets_carry_the_codes_prompts(monkeypatch):
    class FakeSet(torch.utils.data.Dataset):
        def __init__(self, transform, classes):
            self.transform, self.classes = transform, classes

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return self.transform(Image.new("RGB", (8, 8))), 0

    for name, classes in (("aircraft", ["707-320", "A380"]), ("cifar10", ["airplane", "automobile"])):
        monkeypatch.setitem(data.EVAL_DATASETS, name, (lambda root, tf, c=classes: FakeSet(tf, c), "x/"))
    aircraft = data.open_dataset("aircraft", root="/unused")
    assert aircraft.classnames == ["707 320", "a380"]  # the template's names, refined
    assert aircraft.prompts == ["A photo of a boeing 707-320, a type of aircraft.",
                                "A photo of a a380, a type of aircraft."]
    assert data.open_dataset("cifar10", root="/unused").prompts is None


def test_eval_scores_a_set_with_its_own_prompts_only_under_code(monkeypatch):
    from urda_fast.hpt import evaluate

    torch.manual_seed(0)
    clip, tokenizer = load_clip("urda-tiny-vit", None)
    seen = []

    class Recording(evaluate.ZeroShotClassifier):
        def __init__(self, clip, tokenizer, classnames, templates, **kw):
            super().__init__(clip, tokenizer, classnames, templates, **kw)
            seen.append([t.format(c) for c in self.classnames for t in self.templates])

    monkeypatch.setattr(evaluate, "ZeroShotClassifier", Recording)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    own = ZeroShotSet("own", TensorDataset(images, torch.tensor([0, 1] * 3)), ["zero", "one"],
                      prompts=["the digit zero, printed", "the digit one, printed"])
    plain = ZeroShotSet("plain", TensorDataset(images, torch.tensor([1, 0] * 3)), ["zero", "one"])
    common = dict(attack="none", batch_size=6, templates=("a photo of the number {}",), progress=False)
    code = evaluate.zero_shot_robustness(clip, tokenizer, [own, plain], prompts="code", **common)
    assert seen == [["the digit zero, printed", "the digit one, printed"],
                    ["a photo of the number zero", "a photo of the number one"]]
    assert [code["per_dataset"][n]["prompts"] for n in ("own", "plain")] == ["code", "template"]
    seen.clear()
    template = evaluate.zero_shot_robustness(clip, tokenizer, [own], prompts="template", **common)
    assert seen == [["a photo of the number zero", "a photo of the number one"]]
    assert template["per_dataset"]["own"]["prompts"] == "template"
    # the prompts a head is built from are the ones it scores with
    same = ZeroShotSet("own", own.dataset, ["zero", "one"], prompts=["a photo of the number zero",
                                                                    "a photo of the number one"])
    again = evaluate.zero_shot_robustness(clip, tokenizer, [same], prompts="code", **common)
    assert again["per_dataset"]["own"]["clean"] == template["per_dataset"]["own"]["clean"]
    with pytest.raises(ValueError, match="prompts must be one of"):
        evaluate.zero_shot_robustness(clip, tokenizer, [own], prompts="paper", **common)


def test_cw_evaluation_attack_uses_the_codes_margin():
    """The code's CW loss -relu(z_y - max_other + 50): our margin clamped at kappa 50 (it never saturates on cosine
    logits); PGD stays cross-entropy."""
    from urda_fast.hpt.evaluate import make_attack

    head = torch.nn.Linear(3, 2)
    cw, pgd = make_attack(head, "cw10", 1 / 255, 1 / 255), make_attack(head, "pgd10", 1 / 255, 1 / 255)
    assert (cw.loss, cw.kappa, cw.steps) == ("cw", 50.0, 10) and (pgd.loss, pgd.steps) == ("ce", 10)
    logits, labels = torch.tensor([[0.9, -0.9], [0.1, 0.3]]), torch.tensor([0, 0])
    code = -torch.relu(logits[:, 0] - logits[:, 1] + 50).sum()
    torch.testing.assert_close(cw._objective(logits, labels, None, False), code + 50 * 2)
