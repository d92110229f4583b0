"""A least-recently-used cache of decoded images, bounded in megabytes of pixels.

VQA sets ask many questions about one image (easy-VQA: 38k questions, 4k images; VQAv2: ~5 per
image) and every epoch reads every image again, so most reads can skip the decode. `RecordDataset`
keeps one per process (DataLoader workers each hold their own).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from PIL import Image


def _size(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


class ImageCache:
    """Decoded images by key, up to `megabytes` of pixels; each `get` returns a private copy.

    An image bigger than the whole cache is not kept. `megabytes <= 0` keeps nothing.
    """

    def __init__(self, megabytes: float):
        self.max_bytes = megabytes * 2**20
        self._images: OrderedDict[Hashable, Image.Image] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable) -> Image.Image | None:
        image = self._images.get(key)
        if image is None:
            return None
        self._images.move_to_end(key)
        return image.copy()  # a caller drawing on its image must not change the next read

    def put(self, key: Hashable, image: Image.Image) -> None:
        size = _size(image)
        if size > self.max_bytes or key in self._images:
            return
        self._images[key] = image.copy()
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._images.popitem(last=False)
            self._bytes -= _size(old)

    def __len__(self) -> int:
        return len(self._images)
