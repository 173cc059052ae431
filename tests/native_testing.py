"""Shared helper of the native CPU kernel tests (csrc/cpu): count calls of an entry point."""


class count_native:
    """Context manager: while active, ``segformer_fast.kernels.cpu.native()`` returns the real
    extension with the entry point ``entry`` recording its calls; yields the list of calls."""

    def __init__(self, native, entry: str):
        self.native, self.entry, self.calls = native, entry, []

    def __enter__(self):
        import segformer_fast.kernels.cpu as kcpu
        real, entry, calls = self.native, self.entry, self.calls

        class Spy:
            def __getattr__(self, name):
                fn = getattr(real, name)
                if name != entry:
                    return fn

                def spied(*a):
                    calls.append(a)
                    return fn(*a)
                return spied
        self.kcpu, self.orig = kcpu, kcpu.native
        kcpu.native = lambda: Spy()
        return calls

    def __exit__(self, *exc):
        self.kcpu.native = self.orig
