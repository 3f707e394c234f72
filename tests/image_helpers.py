"""Image helpers shared by the transform tests: PSNR between two images, JPEG bytes of an image."""
import io

import numpy as np
from PIL import Image


def psnr(a: Image.Image, b: Image.Image) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def jpeg(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kw)
    return buffer.getvalue()
