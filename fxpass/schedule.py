"""Timestep respacing as guided-diffusion defines it (``timestep_respacing``)."""

from __future__ import annotations

from collections.abc import Sequence


def respaced(diffusion_steps: int, section_counts: str | int | Sequence[int] = "") -> list[int]:
    """Timesteps kept from ``range(diffusion_steps)``, increasing.

    ``section_counts`` is ``""`` (keep all), ``"ddimN"`` (a uniform integer stride giving exactly N
    steps), or comma-separated counts ``"10,15,20"``: the steps are split into that many equal
    sections and each section is sampled at evenly rounded fractional strides.

    >>> respaced(1000, "ddim4")
    [0, 250, 500, 750]
    >>> respaced(100, "10,5")[:3]
    [0, 5, 11]
    """
    if diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be positive, got {diffusion_steps}")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text == "":
            return list(range(diffusion_steps))
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"'{text}': expected ddimN with an integer N") from None
            for stride in range(1, diffusion_steps):
                if len(range(0, diffusion_steps, stride)) == desired:
                    return list(range(0, diffusion_steps, stride))
            raise ValueError(f"cannot take exactly {desired} steps of {diffusion_steps} with an integer stride")
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"'{text}': expected comma-separated step counts such as '250'") from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be positive, got {counts}")
    if len(counts) > diffusion_steps:
        raise ValueError(f"{len(counts)} sections for {diffusion_steps} steps")
    size_per, extra = divmod(diffusion_steps, len(counts))
    steps: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.add(start + round(position))
            position += stride
        start += size
    return sorted(steps)


def model_timesteps(diffusion_steps: int, kept: Sequence[int], rescale_timesteps: bool = False) -> list[float] | list[int]:
    """The timestep values the U-Net sees for each kept step (scaled to 0..1000 when rescaling)."""
    if rescale_timesteps:
        return [float(t) * (1000.0 / diffusion_steps) for t in kept]
    return list(kept)
