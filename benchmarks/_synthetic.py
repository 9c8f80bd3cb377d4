"""Catalogue-like training data made up on the spot, shared by the training-speed benchmarks.

Random images cost nothing to make and time the step as real ones would; the titles and concept
links have the shape of catalogue titles (brand, modifiers, a product-type head) so that the
tokenizer and the concept term see realistic lengths. Imported by the scripts beside it, which put
this directory on ``sys.path`` (it is not a package: the scripts also run as plain files).
"""

from __future__ import annotations

import numpy as np

from lightclip.imagecache import ImageCache

WORDS = (
    "Men Women Navy Blue Black White Red Check Striped Printed Slim Fit Casual Formal Shirt Tshirt Jeans Dress "
    "Kurta Sports Shoes Watch Handbag Cotton Leather Round Neck Polo Analogue Sandals Flip Flops Track Pants"
).split()


def synthetic(n: int, size: int, seed: int = 0) -> tuple[ImageCache, list[str], list[list[str]]]:
    """``n`` random uint8 images, catalogue-like titles and concept links (head noun, modifiers)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
    titles, links = [], []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=int(rng.integers(5, 9))))
        titles.append(f"Brand{rng.integers(0, 300)} " + " ".join(words) + f" {rng.integers(1000, 99999)}")
        head, mods = words[-1].lower(), [w.lower() for w in words[-4:-1]]
        links.append([" ".join(mods[-k:] + [head]) for k in (3, 2, 1)] + [head])
    return ImageCache.from_array(images), titles, links
