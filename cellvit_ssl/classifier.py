"""Trained classifiers for lab pipelines: :func:`load_classifier` and :class:`Classifier`.

A classifier is a pre-trained backbone (frozen, fully fine-tuned, or with LoRA adapters) and a
linear head on its image embedding, written by ``python -m cellvit_ssl.finetune``. It reads
images exactly as the :class:`~cellvit_ssl.encoder.Encoder` does (it *is* an encoder, with the
backbone's preprocessing contract and channel vocabulary), so ``predict`` sees what
fine-tuning saw.

Examples:
    >>> from cellvit_ssl import load_classifier  # doctest: +SKIP
    >>> clf = load_classifier("runs/finetune/classifier.pt")  # doctest: +SKIP
    >>> p = clf.predict(stack, channels=["nucleus", "microtubules", "er", "protein"])  # doctest: +SKIP
    >>> p.labels, p.probabilities  # class names, (B, K) probabilities  # doctest: +SKIP
    >>> p, ids = clf.predict_cells(image, mask, channels=[...])  # one row per cell  # doctest: +SKIP

The file (``format`` :data:`~cellvit_ssl.checkpoint.CLASSIFIER_FORMAT`) holds the head (the
embedding's standardisation and the linear layer, :class:`LinearHead`), the classes and decision
thresholds, the LoRA adapters (``lora`` mode), and either the backbone's weights (``full`` mode,
or ``finetune.standalone``) or a reference to the pre-trained checkpoint (its path and SHA-256,
checked when loading) — which keeps a linear or LoRA classifier to a few hundred kB instead of
the backbone's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cellvit_ssl.checkpoint import CLASSIFIER_FORMAT, ENCODER_FORMAT, TRAINING_FORMAT, load_checkpoint, save_checkpoint
from cellvit_ssl.config import config_to_dict
from cellvit_ssl.encoder import Encoder, Progress, pretrained_backbone, resolve_device
from cellvit_ssl.errors import CheckpointError
from cellvit_ssl.labels import decide
from cellvit_ssl.lora import LoRA, LoRASpec
from cellvit_ssl.models.base import ChannelAdaptiveViT

#: Version of the classifier file layout.
CLASSIFIER_VERSION = 2
#: Fine-tuning modes (``finetune.mode``).
MODES = ("linear", "full", "lora")


class LinearHead(nn.Module):
    """The classifier's head: the embedding standardised per feature, then a linear layer.

    The standardisation is a linear probe's (scikit-learn's ``StandardScaler`` before a logistic
    regression; MAE's parameter-free BatchNorm before its linear probe): the mean and standard
    deviation of the training rows' pre-trained embeddings, set once by :meth:`fit_standardization`
    before training and fixed after, so that the head trains at one learning rate whatever the
    backbone's feature scale, and every process under torchrun, every resumed run and every
    loaded classifier standardise alike. Until fitted (or in a file written before it existed)
    it is the identity.

    Args:
        dim: Embedding size.
        n_classes: Outputs (logits).
    """

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(int(dim)))
        self.register_buffer("inv_std", torch.ones(int(dim)))
        self.linear = nn.Linear(int(dim), int(n_classes))
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    @property
    def out_features(self) -> int:
        """Number of classes."""
        return self.linear.out_features

    @torch.no_grad()
    def fit_standardization(self, embeddings: np.ndarray | torch.Tensor, eps: float = 1e-6) -> None:
        """Set the standardisation to the mean and standard deviation of ``embeddings`` ``(N, dim)``."""
        z = torch.as_tensor(np.asarray(embeddings, np.float64))
        self.mean.copy_(z.mean(0).to(self.mean))
        self.inv_std.copy_((1.0 / (z.std(0, unbiased=False) + eps)).to(self.inv_std))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` of embeddings ``(B, dim)``."""
        return self.linear((z - self.mean) * self.inv_std)


class ClassifierNet(nn.Module):
    """A backbone and a :class:`LinearHead` on its image embedding: what fine-tuning trains.

    Args:
        backbone: The channel-adaptive backbone (its :meth:`embed` feeds the head).
        n_classes: Outputs of the head (logits).
    """

    def __init__(self, backbone: ChannelAdaptiveViT, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = LinearHead(int(backbone.output_dim), int(n_classes))

    def forward(self, x: torch.Tensor, channel_ids: torch.Tensor, channel_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits ``(B, n_classes)`` of model inputs ``(B, C, H, W)``."""
        return self.head(self.backbone.embed(x, channel_ids, channel_mask))


@dataclass
class Predictions:
    """What a classifier says about some images or cells.

    Attributes:
        classes: Class names, the columns of ``probabilities``.
        probabilities: float32 ``(N, K)``: softmax (single-label) or per-class sigmoid (multi-label).
        chosen: bool ``(N, K)``: the predicted classes (argmax, or each class over its threshold).
        multi_label: Whether several classes may be chosen.
    """

    classes: list[str]
    probabilities: np.ndarray
    chosen: np.ndarray
    multi_label: bool

    @property
    def labels(self) -> np.ndarray:
        """The predicted class of each row (multi-label: the chosen classes joined by ``;``, may be empty)."""
        names = np.asarray(self.classes, dtype=object)
        if not self.multi_label:
            return names[np.argmax(self.chosen, axis=1)].astype(str)
        return np.array([";".join(names[row]) for row in self.chosen], dtype=object).astype(str)

    def table(self) -> pd.DataFrame:
        """One row per prediction: ``predicted``, ``prob_<class>`` and, multi-label, ``predicted_<class>`` (bool)."""
        out = {"predicted": self.labels}
        out.update({f"prob_{c}": self.probabilities[:, k] for k, c in enumerate(self.classes)})
        if self.multi_label:
            out.update({f"predicted_{c}": self.chosen[:, k] for k, c in enumerate(self.classes)})
        return pd.DataFrame(out)


class Classifier(Encoder):
    """A fine-tuned classifier: an :class:`~cellvit_ssl.encoder.Encoder` plus a linear head.

    Every :class:`Encoder` method works (``embed`` gives the fine-tuned embedding);
    :meth:`predict`, :meth:`predict_proba` and :meth:`predict_cells` add the head.

    Args:
        net: The backbone and head.
        config: The pre-training run config (the backbone's architecture and data contract).
        device: Where to run.
        classes: Class names in the head's output order.
        multi_label: Sigmoid outputs and per-class thresholds instead of a softmax.
        thresholds: Multi-label decision threshold per class (default 0.5 each).
        mode: ``linear``, ``full`` or ``lora``.
        lora: The adapters (``lora`` mode, not merged away).
        source: Where the classifier came from.
        preprocess: The backbone's preprocessing contract.
        vocabulary: The backbone's channel vocabulary.
        base: ``{"path", "sha256"}`` of the pre-trained checkpoint the backbone came from.

    Attributes:
        classes, multi_label, thresholds, mode, lora, base, metrics (what fine-tuning measured).
    """

    def __init__(self, net: ClassifierNet, config, device: str | torch.device, *, classes: Sequence[str],
                 multi_label: bool, thresholds: Sequence[float] | None = None, mode: str = "linear",
                 lora: LoRA | None = None, source: str | None = None, preprocess=None, vocabulary=None,
                 base: dict | None = None, metrics: dict | None = None) -> None:
        super().__init__(net.backbone, config, device, source=source, preprocess=preprocess, vocabulary=vocabulary)
        self.net = net.eval().to(self.device)
        self.head = net.head
        self.classes = [str(c) for c in classes]
        if len(self.classes) != self.head.out_features:
            raise CheckpointError(f"{source}: {len(self.classes)} class names for a head of "
                                  f"{self.head.out_features} outputs")
        self.multi_label = bool(multi_label)
        self.thresholds = None if thresholds is None else np.asarray(thresholds, np.float32)
        self.mode = mode
        self.lora = lora
        self.base = base
        self.metrics = metrics or {}

    # ----------------------------------------------------------------- predictions
    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, K)`` of embeddings from :meth:`embed` (the head, then softmax / sigmoid)."""
        z = torch.as_tensor(np.asarray(embeddings, np.float32), device=self.device)
        with torch.inference_mode():
            logits = self.head(z).float()
            p = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return p.cpu().numpy()

    def predictions(self, probabilities: np.ndarray) -> Predictions:
        """:class:`Predictions` of probabilities (argmax, or the per-class thresholds)."""
        probabilities = np.asarray(probabilities, np.float32)
        return Predictions(self.classes, probabilities, decide(probabilities, self.multi_label, self.thresholds),
                           self.multi_label)

    def predict_proba(self, images, channels: Sequence[str], batch_size: int = 64, progress: Progress = False,
                      allow_missing: bool = False) -> np.ndarray:
        """Class probabilities ``(B, K)`` of images (arguments as :meth:`Encoder.embed`)."""
        return self.probabilities(self.embed(images, channels, batch_size, progress, allow_missing))

    def predict(self, images, channels: Sequence[str], batch_size: int = 64, progress: Progress = False,
                allow_missing: bool = False) -> Predictions:
        """Predictions for ``(C, H, W)`` or ``(B, C, H, W)`` images (arguments as :meth:`Encoder.embed`).

        Raises:
            DataError: As :meth:`Encoder.embed` (shape, channel names, NaN pixels).
        """
        return self.predictions(self.predict_proba(images, channels, batch_size, progress, allow_missing))

    def predict_cells(self, image, labels, channels: Sequence[str], crop_size: int | None = None,
                      mask_background: bool = False, batch_size: int = 64, progress: Progress = False,
                      allow_missing: bool = False) -> tuple[Predictions, np.ndarray]:
        """One prediction per cell of a segmentation mask (arguments as :meth:`Encoder.embed_cells`).

        Returns:
            ``(predictions, label_ids (n_cells,))``, rows in ascending label-id order.
        """
        z, ids = self.embed_cells(image, labels, channels, crop_size, mask_background, batch_size, progress,
                                  allow_missing)
        return self.predictions(self.probabilities(z)), ids

    # ----------------------------------------------------------------- LoRA
    @property
    def lora_merged(self) -> bool:
        """True when LoRA adapters are merged into the backbone weights (always False without adapters)."""
        return self.lora is not None and self.lora.merged

    def merge_lora(self, unload: bool = False) -> None:
        """Merge the LoRA updates into the backbone weights (same outputs, no adapter matmuls).

        Args:
            unload: Also drop the adapters and fuse q, k and v back into one projection: the
                backbone in its pre-trained layout, fastest for inference (no way back: the
                classifier then has no :attr:`lora`).

        Raises:
            CheckpointError: If the classifier has no adapters.
        """
        lora = self._require_lora()
        if unload:
            lora.unload()
            self.lora = None
        else:
            lora.merge()

    def unmerge_lora(self) -> None:
        """Take merged LoRA updates out of the backbone weights again."""
        self._require_lora().unmerge()

    def _require_lora(self) -> LoRA:
        if self.lora is None:
            raise CheckpointError(f"{self.source}: this {self.mode} classifier has no LoRA adapters "
                                  "(already merged, or not fine-tuned with finetune.mode=lora)")
        return self.lora

    def count_parameters(self) -> dict[str, int]:
        """``total`` parameters of backbone and head, and ``trainable``: what its fine-tuning mode trains."""
        total = sum(p.numel() for p in self.net.parameters())
        head = sum(p.numel() for p in self.head.parameters())
        if self.mode == "full":
            trainable = total
        elif self.lora is not None:
            trainable = head + sum(p.numel() for p in self.lora.adapter_parameters())
        else:
            trainable = head
        return {"total": int(total), "trainable": int(trainable)}

    # ----------------------------------------------------------------- file
    def payload(self, standalone: bool | None = None, extra: dict | None = None) -> dict:
        """The classifier file's content.

        Args:
            standalone: Store the backbone's weights (LoRA: merged into them) instead of a
                reference to the pre-trained checkpoint. Default: only when the backbone was
                changed without adapters (``full``) or there is no reference.
            extra: More plain-data entries (``metrics``, ``finetune`` settings).
        """
        standalone = (self.mode == "full" or self.base is None) if standalone is None else standalone
        unloaded = self.mode == "lora" and self.lora is None
        if not standalone and (self.mode == "full" or self.base is None or self.lora_merged or unloaded):
            raise CheckpointError("this classifier's backbone differs from its pre-trained checkpoint; it can only "
                                  "be saved standalone (with the backbone's weights)")
        info = {"mode": self.mode, "classes": list(self.classes), "multi_label": self.multi_label,
                "thresholds": None if self.thresholds is None else [float(t) for t in self.thresholds],
                "lora": None if self.lora is None else self.lora.spec.to_dict(),
                "merged": bool(standalone and self.mode == "lora")}
        payload = {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION, "config": config_to_dict(self.config),
                   "preprocess": self.preprocess.to_dict(), "vocabulary": self.vocabulary.to_dict(),
                   "classifier": info, "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()}}
        if standalone:
            state = self.lora.merged_state_dict() if self.lora is not None else self.model.state_dict()
            payload["backbone"] = {k: v.detach().cpu() for k, v in state.items()}
        else:
            payload["base"] = dict(self.base)
            if self.lora is not None:
                payload["adapters"] = self.lora.state_dict()
        payload["metrics"] = self.metrics
        payload.update(extra or {})
        return payload

    def save(self, path: str | Path, standalone: bool | None = None, extra: dict | None = None) -> Path:
        """Write the classifier file atomically (see :meth:`payload`); returns the path."""
        return save_checkpoint(self.payload(standalone, extra), path)


def _resolve_base(payload: dict, path: Path, base: str | Path | None) -> Path:
    """The pre-trained checkpoint a classifier refers to, checked against its recorded SHA-256.

    Raises:
        CheckpointError: If it cannot be found or is not the file the classifier was trained on.
    """
    from cellvit_ssl.embed_io import file_sha256

    recorded = payload.get("base") or {}
    wanted = str(recorded.get("sha256", ""))
    if base is not None:
        candidates = [Path(base).expanduser()]
    else:
        candidates = [Path(str(recorded.get("path", ""))).expanduser(), path.parent / Path(str(recorded.get("path",
                                                                                                      ""))).name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CheckpointError(f"classifier {str(path)!r} keeps only its head (and adapters); its pre-trained "
                              f"checkpoint {recorded.get('path')!r} is not there. Pass it: "
                              "load_classifier(path, base=...) (command line: predict.base=...)")
    if file_sha256(found) != wanted:
        raise CheckpointError(f"{found} is not the checkpoint classifier {str(path)!r} was fine-tuned from (its "
                              f"SHA-256 differs from the recorded {wanted[:12]}…); pass the original file as base=")
    return found


def load_classifier(path: str | Path, device: str | torch.device | None = None, base: str | Path | None = None,
                    payload: dict | None = None) -> Classifier:
    """Load a :class:`Classifier` written by ``python -m cellvit_ssl.finetune``.

    Args:
        path: The classifier file (``classifier.pt``).
        device: ``cpu``, ``cuda`` or ``cuda:N``; default CUDA when available, else CPU.
        base: The pre-trained checkpoint, for a classifier that refers to it and was moved
            away from it (default: the recorded path, then a file of that name beside ``path``).
        payload: The file's content when already loaded.

    Raises:
        CheckpointError: If the file is missing, corrupt or not a classifier, or its
            pre-trained checkpoint is missing or another file.
        ConfigError: If the device does not exist here.
    """
    path = Path(path).expanduser()
    device = resolve_device(device)
    payload = payload if payload is not None else load_checkpoint(path, expect=(CLASSIFIER_FORMAT,))
    info = payload.get("classifier")
    if not isinstance(info, dict) or "head" not in payload:
        raise CheckpointError(f"classifier {str(path)!r} has no head / class list; it is damaged")
    if int(payload.get("version", 0)) > CLASSIFIER_VERSION:
        raise CheckpointError(f"classifier {str(path)!r} has layout version {payload['version']}, newer than this "
                              f"cellvit_ssl reads ({CLASSIFIER_VERSION}); update cellvit_ssl")
    base_info = payload.get("base")
    if "backbone" in payload:
        model, config, vocabulary, preprocess = pretrained_backbone(payload, path, state=payload["backbone"])
    else:
        source = _resolve_base(payload, path, base)
        base_payload = load_checkpoint(source, expect=(ENCODER_FORMAT, TRAINING_FORMAT))
        model, config, vocabulary, preprocess = pretrained_backbone(base_payload, source)
        base_info = {**base_info, "path": str(source.resolve())}
    lora = None
    if info.get("lora") and not info.get("merged"):
        lora = LoRA(model, LoRASpec(**info["lora"]))
        if "adapters" not in payload:
            raise CheckpointError(f"classifier {str(path)!r} is a LoRA classifier without its adapters")
        lora.load_state_dict(payload["adapters"], str(path))
    net = ClassifierNet(model, len(info["classes"]))
    head = dict(payload["head"])
    if int(payload.get("version", 0)) < 2:  # version 1: a bare nn.Linear, no standardisation (the identity)
        head = {**net.head.state_dict(), **{f"linear.{k}": v for k, v in head.items()}}
    try:
        net.head.load_state_dict(head)
    except RuntimeError as exc:
        raise CheckpointError(f"classifier {str(path)!r}: the head does not fit the backbone: {exc}") from exc
    return Classifier(net, config, device, classes=info["classes"], multi_label=bool(info["multi_label"]),
                      thresholds=info.get("thresholds"), mode=str(info["mode"]), lora=lora, source=str(path),
                      preprocess=preprocess, vocabulary=vocabulary, base=base_info,
                      metrics=payload.get("metrics") or {})
