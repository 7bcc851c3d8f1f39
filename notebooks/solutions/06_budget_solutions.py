# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Solutions — 06 budget axis
# The exercises are about the interval, so these answers use per-image results you can make
# without training: three seeds of two arms on 5,000 test images, where arm *a* is right on
# 0.3 % more images than arm *b* and the two disagree on about 6 % of the images (the size of
# the quick profile's =W3A4-size pair). With the budget runs of notebook 06 at hand, replace
# `bits_a`/`bits_b` by `runs.correct_matrix(...)` of two arms of `budget_runs.json`.

# %% tags=["parameters"]
n_images = 5000
n_seeds = 3
seed = 0

# %%
import numpy as np

from hmqat import stats
from hmqat.study import lessons

rng = np.random.default_rng(seed)
base = rng.random(n_images) < 0.87                        # images arm b gets right
hard = rng.random(n_images) < 0.06                        # images the two arms disagree on
favour_a = rng.random(n_images) < 0.525                   # of those, a wins slightly more
bits_b = np.stack([np.where(hard, ~favour_a & base | (rng.random(n_images) < 0.02), base)
                   for _ in range(n_seeds)])
bits_a = np.stack([np.where(hard, favour_a | (rng.random(n_images) < 0.02), base)
                   for _ in range(n_seeds)])
print("per-seed test top-1, a:", (100 * bits_a.mean(1)).round(2), " b:",
      (100 * bits_b.mean(1)).round(2))

# %% [markdown]
# ## Exercise 06.1 (fill in) and exercise 1: the image term of one seed

# %%
def image_se(a, b) -> float:
    d = 100.0 * (np.asarray(a, float) - np.asarray(b, float))
    return float(d.std(ddof=1) / np.sqrt(len(d)))


lessons.check_06_image_se(image_se, bits_a[0], bits_b[0])

# %% [markdown]
# ## Exercise 2: seed-only against seeds × images
# The seed-only interval uses the spread of the three per-seed differences. All three seeds are
# scored on the same images, so the images' own noise is shared and the three differences agree
# more than another test set would let them: the crossed interval (Eq. V) adds the image term
# σ_i²/M, which no number of seeds shrinks.

# %%
t = stats.paired_difference(100 * bits_a.mean(1), 100 * bits_b.mean(1))
crossed = stats.crossed_paired_difference(100.0 * bits_a, 100.0 * bits_b)
print("seed-only:", t, " half-width", round(t.half_width, 3))
print("seeds × images:", crossed, " half-width", round(crossed.half_width, 3))
print(f"image part of Var(D̄): {crossed.image_var:.4f}, seed part: {crossed.seed_var:.4f}")
print(f"one seed's image SE: {image_se(bits_a[0], bits_b[0]):.3f} points")

# %% [markdown]
# ## Exercise 3: where does the sign change?
# A sign change is seen between two budgets whose intervals exclude 0 on opposite sides. When a
# difference is undecided at 150 steps and at one epoch, a budget between them cannot decide it
# either; a larger budget (two or four epochs) can, if its half-width is small enough. The
# half-width at any budget is at least about 1.96 × the image SE above, whatever the seeds.
