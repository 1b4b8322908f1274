"""`imagefs build`: a Dockerfile to an image, daemonless, on a lazily mounted base.

frontend (parse, stages) and words (expansion) and config (metadata instructions) are pure;
context (.dockerignore, sources), copy, rootfs (paths inside an image), layerdiff (upper dir
-> layer), runtime (overlayfs, runc), cache and progress are the parts; builder runs them.
"""
