"""The zero-shot evaluation prompts of the PMG-AFT / HPT-GPD code, per dataset.

Their evaluation reads each set through a torchvision dataset class and, where that class has ``clip_prompts``,
scores the set with those prompts, one per class. Stock torchvision has none: they come from the modified classes
of TeCoA's code (``replace/torchvision.datasets``), which PMG-AFT names as its code framework and ships one of
(``caltech.py``); the other sets get ``"This is a photo of a {}"`` over their class names.
The papers' figures must come from sets prompted this way (with stock torchvision the code cannot prompt PCAM or
Flowers102 at all, for want of class names), so ``hpt eval --prompts code`` (the default) uses them too;
``--prompts template`` puts every set's class names into ``--templates``.

Each rule below is the expression of that dataset's file, applied to torchvision's class names (or, for Flowers102
and EuroSAT, to the names those files ship, kept here as they are, stray spaces included). Sets without a rule
(CIFAR-10/100, STL-10, SUN397, ImageNet, TinyImageNet, folders) take the template. Caltech101 is our reading: as
published, the code fails on it (TeCoA's file gives it no prompts and no class names; PMG-AFT's cuts ``NNN.``
prefixes Caltech101's folders do not have, with a ``str.clone()`` that does not exist); we give it PMG-AFT's
``"A photo of a {}."`` over its folder names.
"""

from __future__ import annotations

FLOWERS102_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colts foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia?", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen ",
    "watercress", "canna lily", "hippeastrum ", "bee balm", "ball moss", "foxglove", "bougainvillea", "camellia",
    "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)
# EuroSAT's classes in torchvision's (folder) order, as its file rewrites them for the prompt
EUROSAT_NAMES = (
    "annual crop land", "a forest", "brushland or shrubland", "a highway or a road", "industrial buildings",
    "pasture land", "permanent crop land", "residential buildings", "a river", "a sea or a lake",
)
# PCAM's two prompts as its file writes them ("Tthis" included)
PCAM_PROMPTS = (
    "Tthis is a photo of healthy lymph node tissue.", "This is a photo of lymph node tumor tissue.",
)


def _lower_spaced(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ")


def _aircraft(name: str) -> str:
    # Boeing's variants ("707-320") are numbers alone; the file adds the maker and keeps '-' and '/' ("f-16a/b")
    return ("Boeing " + name if name.startswith("7") else name).lower().replace("_", " ")


def _caltech256(name: str) -> str:
    return _lower_spaced(name[4:].replace("-101", "")).strip()  # "253.faces-easy-101" -> "faces easy"


RULES = {
    "food101": ("A photo of {}, a type of food.", _lower_spaced),
    "pets": ("A photo of a {}, a type of pet.", _lower_spaced),
    "dtd": ("A surface with a {} texture.", _lower_spaced),
    "aircraft": ("A photo of a {}, a type of aircraft.", _aircraft),
    "cars": ("A photo of a {}.", lambda name: _lower_spaced(name[:-5])),  # the model year dropped
    "caltech256": ("A photo of a {}.", _caltech256),
    "caltech101": ("A photo of a {}.", lambda name: _lower_spaced(name).strip()),
}
SHIPPED = {
    "flowers102": ("A photo of a {}, a type of flower.", FLOWERS102_NAMES),
    "eurosat": ("A centered satellite photo of {}.", EUROSAT_NAMES),
}
PROMPT_MODES = ("code", "template")


def code_prompts(name: str, classes) -> list | None:
    """The code's prompt for each class of dataset ``name`` (an ``EVAL_DATASETS`` key), in label order, from
    torchvision's class names ``classes``; None for a set the code prompts with the template. A set whose class
    count differs from the shipped list's is an error (another release would be prompted with the wrong names)."""
    if name == "pcam":
        shipped = PCAM_PROMPTS
    elif name in SHIPPED:
        template, names = SHIPPED[name]
        shipped = [template.format(_lower_spaced(n)) for n in names]
    elif name in RULES:
        template, refine = RULES[name]
        return [template.format(refine(str(c))) for c in classes]
    else:
        return None
    if len(classes) != len(shipped):
        raise ValueError(f"hpt: {name} has {len(classes)} classes, but the code's prompts are for {len(shipped)}: "
                         "another release of the dataset? Use --prompts template")
    return list(shipped)
