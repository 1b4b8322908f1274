"""imagefs: mount OCI and Docker images as lazily fetched, read-only FUSE filesystems."""

__version__ = "0.1.0"
