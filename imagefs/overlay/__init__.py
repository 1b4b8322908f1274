"""Pure merge of layer TOCs into the image tree: lookup, readdir, whiteouts, hardlinks, inodes."""

from imagefs.overlay.merge import ROOT_INODE, Attrs, InodeError, NeedLayer, Overlay

__all__ = ["ROOT_INODE", "Attrs", "InodeError", "NeedLayer", "Overlay"]
