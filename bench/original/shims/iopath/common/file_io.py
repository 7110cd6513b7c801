"""Stand-in for iopath's path manager: local files only (ImageBind opens its BPE vocabulary with it)."""


class _LocalPathManager:
    @staticmethod
    def open(path, mode="r", **kwargs):
        return open(path, mode, **kwargs)

    @staticmethod
    def exists(path):
        import os

        return os.path.exists(path)


g_pathmgr = _LocalPathManager()
