"""Loading a trained model (a workdir's checkpoint or the pretrained one) and applying it."""
from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from jaxseg import losses
from jaxseg.models import create_model

PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent / "pretrained"
PRETRAINED_WEIGHTS = "weights"
MODEL_CARD = "model_card.json"


def person_probabilities(model, images: jax.Array, *, flip_tta: bool = False) -> jax.Array:
    """(B, S, S) P(person) from uint8 images in inference mode, optionally averaged with the mirror."""
    probs = losses.person_probability(model(images, train=False))
    if flip_tta:
        flipped = losses.person_probability(model(images[:, :, ::-1], train=False))
        probs = (probs + flipped[:, :, ::-1]) / 2
    return probs


def config_from_json(text: str | dict) -> ml_collections.ConfigDict:
    """A ConfigDict from the JSON stored with checkpoints and model cards."""
    data = json.loads(text) if isinstance(text, str) else text
    return ml_collections.ConfigDict(data)


def load_pretrained(directory: str | pathlib.Path | None = None):
    """(model, config, card) of the pretrained model stored in the repository (or `directory`)."""
    directory = pathlib.Path(directory or PRETRAINED_DIR)
    card_path = directory / MODEL_CARD
    if not card_path.exists():
        raise FileNotFoundError(
            f"no pretrained model at {directory}: pass --workdir with a trained run instead")
    card = json.loads(card_path.read_text())
    config = config_from_json(card["config"])
    # Shapes only: initialising real weights that the restore overwrites costs seconds.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(config.model)))
    state = ocp.StandardCheckpointer().restore((directory / PRETRAINED_WEIGHTS).absolute(), abstract)
    return nnx.merge(graphdef, state), config, card


def save_pretrained(model, config, card: dict, directory: str | pathlib.Path = PRETRAINED_DIR):
    """Writes a model's inference state (orbax, no pickle) and its card to `directory`."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PRETRAINED_WEIGHTS, nnx.state(model), force=True)
    checkpointer.wait_until_finished()
    card = dict(card, config=json.loads(config.to_json()))
    (directory / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")


def load_from_workdir(workdir: str, checkpoint: str = "best"):
    """(model, config, step) from a training workdir's 'best', 'latest' or numbered checkpoint."""
    from jaxseg import train  # the train state's layout is defined there

    return train.load_model(workdir, checkpoint)


def load(workdir: str | None = None, checkpoint: str = "best"):
    """(model, config, description): a workdir's checkpoint, else the pretrained model."""
    if workdir:
        model, config, step = load_from_workdir(workdir, checkpoint)
        return model, config, {"source": str(workdir), "checkpoint_step": step}
    model, config, card = load_pretrained()
    return model, config, {"source": "pretrained", "checkpoint_step": card.get("steps")}

