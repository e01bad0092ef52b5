"""DUCH core: unsupervised contrastive cross-modal hashing for remote-sensing archives.

Pure torch + numpy (+ pyarrow for files). Never imports ray, fastapi or pydantic.
"""

__version__ = "0.1.0"
