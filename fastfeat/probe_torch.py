"""The probe's torch engine: scikit-learn's two linear objectives, minimised with full-batch L-BFGS
over feature batches streamed from ``fastfeat.data``, so the training set never has to fit in memory.

Each evaluation of the objective is one pass over the training rows (gradients accumulated batch by
batch); L-BFGS with a strong-Wolfe line search then converges to the same optimum scikit-learn's
solvers reach, which is why the two engines agree (tested within 1.5 points) where a stochastic
optimiser would only approach it.  When the rows fit in ``cache_bytes`` they are read once and
kept on the device instead of being streamed on every pass.

Rows are standardised per fit as the sklearn engine does (``fastfeat.probe_scaling``); a fit that
reaches ``max_iter`` L-BFGS iterations continues for up to ``CONTINUATIONS`` more rounds before it is
counted as not converged.

Objectives (n rows, scaled by 1/n, which does not move the optimum):
* logreg: C · Σ cross-entropy(W x + b, y) + ½‖W‖²  (bias not penalised, as LogisticRegression);
* svm:    C · Σ_k Σ_i max(0, 1 − y_ik (w_k·x_i + b_k))² + ½ Σ_k (‖w_k‖² + b_k²), y_ik = ±1
          (one-vs-rest squared hinge with the bias penalised, as LinearSVC / liblinear).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import FeatureDataset
from .probe_scaling import ONE_THREAD_ELEMENTS, l2_normalize_rows, scale_from, threads_for
from .runtime import resolve_device

DEFAULT_CACHE_BYTES = 1 << 30
CONTINUATIONS = 4  # extra rounds of max_iter iterations for a fit that has not converged
STREAM_BATCH = 4096  # rows per streamed batch: 16 MB of float32 4096-d features


class TorchEngine:
    name = "torch"

    def __init__(
        self, path: str, layer: str, classifier: str, l2_normalize: bool, n_classes: int, codes: np.ndarray,
        device: str = "auto", cache_bytes: int = DEFAULT_CACHE_BYTES, max_iter: int = 500,
    ):  # fmt: skip
        self.path, self.layer, self.classifier, self.l2 = path, layer, classifier, l2_normalize
        self.n_classes, self.codes = n_classes, torch.from_numpy(codes)
        self.device = resolve_device(device)
        self.cache_bytes, self.max_iter = cache_bytes, max_iter
        self.dim = FeatureDataset(path, layer).shards.layer_dims[layer]
        self._cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # rows -> (features, row numbers)
        self.not_converged = 0
        self.refits = 0  # fits continued past max_iter iterations

    def _batches(self, rows: np.ndarray):
        """(x float32 [B, dim], y [B]) on the device, over ``rows`` (every row once)."""
        key = rows.tobytes()
        if key in self._cache:  # labels looked up again: set_codes may have changed them since
            x, row_numbers = self._cache[key]
            for i in range(0, len(x), STREAM_BATCH):
                yield x[i : i + STREAM_BATCH], self.codes[row_numbers[i : i + STREAM_BATCH]].to(self.device)
            return
        keep = len(rows) * self.dim * 4 <= self.cache_bytes
        xs, row_parts = [], []
        for batch in FeatureDataset(self.path, self.layer, batch_size=STREAM_BATCH, rows=rows):
            x = batch[self.layer].to(self.device, non_blocking=True).float()
            x = l2_normalize_rows(x) if self.l2 else x
            y = self.codes[batch["row"]].to(self.device)
            if keep:
                xs.append(x)
                row_parts.append(batch["row"])
            yield x, y
        if keep and xs:
            self._cache = {key: (torch.cat(xs), torch.cat(row_parts))}  # one set at a time: bounded memory

    def set_codes(self, codes: np.ndarray) -> None:
        """New labels for every row (class index, -1 unused), e.g. one VOC class after another; cached
        features stay."""
        self.codes = torch.from_numpy(np.asarray(codes, dtype=np.int64))

    def _loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classifier == "logreg":
            return F.cross_entropy(logits, y, reduction="sum")
        signs = torch.full_like(logits, -1.0).scatter_(1, y[:, None], 1.0)
        return F.relu(1.0 - signs * logits).square().sum()

    def fit(self, rows: np.ndarray, y: np.ndarray, c: float, warm=None):
        """(W [dim, K], b [K], mean row, scale) minimising the objective on the standardised ``rows``
        (their labels come from the codes); ``warm``, an earlier fit on the same rows, is the start."""
        with threads_for(len(rows) * self.dim if self.device.type == "cpu" else ONE_THREAD_ELEMENTS + 1):
            return self._fit(np.sort(rows), c, warm)

    def _fit(self, rows: np.ndarray, c: float, warm):
        n = len(rows)
        mean, scale = self._standardizer(rows)
        if warm is not None:
            w, b = (t.detach().clone().requires_grad_(True) for t in warm[:2])
        else:
            w = torch.zeros(self.dim, self.n_classes, device=self.device, requires_grad=True)
            b = torch.zeros(self.n_classes, device=self.device, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=self.max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-12,
        )  # fmt: skip
        penalised_bias = self.classifier == "svm"

        def closure():
            opt.zero_grad()
            total = 0.0
            for x, yb in self._batches(rows):
                loss = self._loss_sum(((x - mean) / scale) @ w + b, yb) * (c / n)
                loss.backward()
                total += loss.item()
            reg = (w.square().sum() + (b.square().sum() if penalised_bias else 0.0)) / (2 * n)
            reg.backward()
            return torch.tensor(total + reg.item())

        state, max_eval = opt.state[opt._params[0]], opt.param_groups[0]["max_eval"]
        for round_ in range(1 + CONTINUATIONS):
            iters, evals = state.get("n_iter", 0), state.get("func_evals", 0)
            opt.step(closure)
            # L-BFGS stops at max_iter iterations or max_eval evaluations without saying which, or why.
            stopped_at_limit = state["n_iter"] - iters >= self.max_iter or state["func_evals"] - evals >= max_eval
            if not stopped_at_limit:
                break
            self.refits += round_ == 0
        self.not_converged += stopped_at_limit
        return w.detach(), b.detach(), mean, scale

    @torch.no_grad()
    def _standardizer(self, rows: np.ndarray) -> tuple[torch.Tensor, float]:
        """(mean row, scale) of ``rows`` (sorted), in one pass."""
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        square = 0.0
        for x, _ in self._batches(rows):
            total += x.double().sum(0)
            square += float(x.double().square().sum())
        n = max(len(rows), 1)
        mean = total / n
        return mean.float(), scale_from(square / n, float(mean @ mean))

    @torch.no_grad()
    def predict(self, model, rows: np.ndarray) -> np.ndarray:
        """Predicted class of each of ``rows``, in the order given."""
        w, b, mean, scale = model
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        preds = [(((x - mean) / scale) @ w + b).argmax(1).cpu() for x, _ in self._batches(sorted_rows)]
        out = np.empty(len(rows), np.int64)
        out[order] = torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)
        return out

    @torch.no_grad()
    def positive_score(self, model, rows: np.ndarray) -> np.ndarray:
        """For a fit on codes 0/1: z1 - z0 of each row (higher: class 1 more likely), in the order given.

        For logreg that is the log-odds; for the one-vs-rest svm, whose two problems mirror each other
        (w0 = -w1 at the optimum), it is twice class 1's decision value: the same ranking."""
        w, b, mean, scale = model
        order = np.argsort(rows, kind="stable")
        parts = []
        for x, _ in self._batches(rows[order]):
            z = ((x - mean) / scale) @ w + b
            parts.append((z[:, 1] - z[:, 0]).double().cpu())
        out = np.empty(len(rows), np.float64)
        out[order] = torch.cat(parts).numpy() if parts else np.zeros(0)
        return out
