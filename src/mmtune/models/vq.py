"""Image tokenizer: convolutional encoder → vector quantiser → convolutional decoder, and the
patch discriminator its adversarial loss trains against (VQGAN-style, small).

The quantiser keeps its codebook as an exponential moving average of the encoder outputs assigned
to each code (no codebook gradient), adds the commitment loss ‖z − sg(q)‖², passes gradients
straight through, and re-initialises dead codes (EMA usage below a threshold) from encoder
outputs of the current batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of (B, D, H, W) features; EMA codebook with dead-code restarts."""

    def __init__(
        self,
        codes: int,
        dim: int,
        decay: float = 0.99,
        restart_every: int = 20,
        normalize: bool = True,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.codes, self.dim, self.decay, self.normalize = codes, dim, decay, normalize
        self.restart_every, self.eps = restart_every, eps
        embed = F.normalize(torch.randn(codes, dim), dim=1) if normalize else torch.randn(codes, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.ones(codes))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("window", torch.zeros(codes))  # uses since the last restart check
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, H, W) code indices → (B, D, H, W) code vectors."""
        return F.embedding(idx, self.embed).permute(0, 3, 1, 2)

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N,) index of the nearest code."""
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return dist.argmin(1)

    def forward(self, z: torch.Tensor):
        """→ (quantised with straight-through gradient, indices (B, H, W), commitment loss)."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if self.normalize:  # codes and features on the unit sphere: no scale drift
                z = F.normalize(z, dim=1)
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            idx = self.assign(flat.detach())
            if self.training:
                idx = self._ema_update(flat.detach(), idx)
            q = self.embed[idx].view(b, h, w, d).permute(0, 3, 1, 2)
            commit = F.mse_loss(z, q.detach())
            q = z + (q - z).detach()  # straight-through: the decoder's gradient reaches z
        return q, idx.view(b, h, w), commit

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if not self.initialised:  # the first batch: codes start on random encoder outputs
            pick = torch.randint(len(flat), (self.codes,), device=flat.device)
            self.embed.copy_(flat[pick])
            self.embed_avg.copy_(flat[pick])
            self.initialised.fill_(True)
            idx = self.assign(flat)
        onehot = F.one_hot(idx, self.codes).type_as(flat)
        counts = onehot.sum(0)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.codes * self.eps) * n
        embed = self.embed_avg / size[:, None]
        self.embed.copy_(F.normalize(embed, dim=1) if self.normalize else embed)
        self.window += counts
        self.updates += 1
        if self.restart_every and int(self.updates) % self.restart_every == 0:
            self.restart_dead(flat)
            self.window.zero_()
        return idx

    @torch.no_grad()
    def restart_dead(self, flat: torch.Tensor) -> int:
        """Codes unused in the last `restart_every` updates move onto vectors of `flat`, drawn
        with probability ∝ their distance to the nearest code (poorly coded vectors first)."""
        dead = (self.window == 0).nonzero().flatten()
        if len(dead) == 0:
            return 0
        err = (flat - self.embed[self.assign(flat)]).pow(2).sum(1)
        if float(err.sum()) <= 0:
            err = torch.ones_like(err)
        pick = torch.multinomial(err, len(dead), replacement=len(dead) > len(flat))
        self.embed[dead] = flat[pick]
        self.embed_avg[dead] = flat[pick]
        self.cluster_size[dead] = 1.0
        self.restarts += len(dead)
        return len(dead)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(8, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


def _encoder(ch: int, levels: int, dim: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1)]
    c = ch
    for _ in range(levels):
        layers += [nn.Conv2d(c, c * 2, 4, stride=2, padding=1), ResBlock(c * 2)]
        c *= 2
    layers += [nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, dim, 1)]
    return nn.Sequential(*layers)


def _decoder(ch: int, levels: int, dim: int) -> nn.Sequential:
    c = ch * 2**levels
    layers: list[nn.Module] = [nn.Conv2d(dim, c, 3, padding=1), ResBlock(c)]
    for _ in range(levels):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c // 2, 3, padding=1), ResBlock(c // 2)]
        c //= 2
    layers += [nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
    return nn.Sequential(*layers)


class PatchDiscriminator(nn.Module):
    """Strided convolutions → one real/fake logit per image patch; returns (logits, features)."""

    def __init__(self, ch: int = 32, layers: int = 2):
        super().__init__()
        blocks, c_in = [], 3
        for i in range(layers):
            c_out = ch * 2**i
            blocks.append(nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(c_in, 1, 3, padding=1)

    def forward(self, x):
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        return self.out(x), feats


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[relu(1 − D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: −E[D(G(z))]."""
    return -fake_logits.float().mean()


class VQModel(nn.Module):
    """Encoder, quantiser, decoder and discriminator; `spec()` rebuilds it (`rebuild`)."""

    def __init__(self, spec: dict):
        super().__init__()
        self._spec = dict(spec)
        s = self._spec
        levels = int(s["downsample"]).bit_length() - 1
        self.encoder = _encoder(s["channels"], levels, s["code_dim"])
        self.quantizer = VectorQuantizer(
            s["codes"], s["code_dim"], s.get("decay", 0.99), s.get("restart_every", 20), s.get("normalize", True)
        )
        self.decoder = _decoder(s["channels"], levels, s["code_dim"])
        self.discriminator = PatchDiscriminator(s.get("disc_channels", 32), s.get("disc_layers", 2))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training forwards seen

    def spec(self) -> dict:
        return dict(self._spec)

    @property
    def grid(self) -> int:
        return self._spec["image_size"] // self._spec["downsample"]

    def lr_scales(self) -> dict[str, float]:
        """The discriminator's parameters form their own AdamW group (own learning rate)."""
        scale = float(self._spec.get("disc_lr_scale", 1.0))
        return {n: scale for n, _ in self.named_parameters() if n.startswith("discriminator.")}

    def forward(self, pixel_values):
        """→ (reconstruction, code indices (B, h, w), commitment loss)."""
        return self.reconstruct(pixel_values)

    def reconstruct(self, x):
        """→ (reconstruction, code indices (B, h, w), commitment loss)."""
        q, idx, commit = self.quantizer(self.encoder(x))
        return self.decoder(q), idx, commit

    @torch.no_grad()
    def encode(self, x) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, h·w) code indices, row-major."""
        _, idx, _ = self.quantizer(self.encoder(x))
        return idx.flatten(1)

    @torch.no_grad()
    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, h·w) code indices → (B, 3, S, S) normalised pixels."""
        g = self.grid
        return self.decoder(self.quantizer.lookup(idx.view(len(idx), g, g)))

    def discriminate(self, x, frozen: bool = False):
        """(logits, features); `frozen`: through detached weights, so the generator's adversarial
        loss reaches the generator and never the discriminator."""
        if not frozen:
            return self.discriminator(x)
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (x,))


def adaptive_weight(rec_loss, adv_loss, last_layer: torch.Tensor, limit: float = 1e4):
    """‖∇rec‖ / ‖∇adv‖ at the decoder's last layer (VQGAN): the adversarial gradient is scaled to
    the reconstruction gradient, whatever the discriminator's current confidence."""
    if not (torch.is_grad_enabled() and last_layer.requires_grad and adv_loss.requires_grad):
        return torch.tensor(1.0)
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, limit).detach()


def vq_losses(
    model: VQModel, pixel_values, adv_weight: float, adv_start: int, commit_weight: float, perceptual_weight: float
) -> dict[str, torch.Tensor]:
    """One step's losses: L1 + β·commitment
    + λ·adversarial (after `adv_start` steps; λ = adv_weight × the adaptive weight) + optional
    discriminator-feature perceptual term,
    plus the discriminator's hinge loss on detached reconstructions. The generator terms never
    reach the discriminator's weights and the discriminator term never reaches the generator's,
    so the one optimizer step is two independent updates (AdamW is per parameter)."""
    rec, idx, commit = model.reconstruct(pixel_values)
    l1 = (rec.float() - pixel_values.float()).abs().mean()
    total = l1 + commit_weight * commit
    on = bool(model.step >= adv_start)
    if model.training:
        model.step += 1
    real_logits, real_feats = model.discriminate(pixel_values)
    fake_logits, _ = model.discriminate(rec.detach())
    d_loss = hinge_d_loss(real_logits, fake_logits)
    out = {"l1": l1.detach(), "commit": commit.detach(), "d_loss": d_loss.detach()}
    if on and (adv_weight > 0 or perceptual_weight > 0):
        g_logits, g_feats = model.discriminate(rec, frozen=True)
        g_adv = hinge_g_loss(g_logits)
        weight = adv_weight * adaptive_weight(l1, g_adv, model.decoder[-1].weight)
        total = total + weight * g_adv
        out["g_adv"], out["adv_weight"] = g_adv.detach(), weight
        if perceptual_weight > 0:
            perc = sum((a.float() - b.detach().float()).abs().mean() for a, b in zip(g_feats, real_feats, strict=True))
            total = total + perceptual_weight * perc
            out["perceptual"] = perc.detach()
    out["loss"] = total + d_loss
    out["codes_used"] = torch.tensor(float(idx.unique().numel()))
    return out
