"""Build the optional C accelerator; everything else is in pyproject.toml.

The extensions are ``optional``: where libsodium's or OpenSSL's headers (libsodium-dev,
libssl-dev) or a compiler are missing the install still succeeds and
``secureiod.secureio.packet`` uses its pure-Python path.
"""

from setuptools import Extension, setup


def _extension(name: str, source: str) -> Extension:
    """One of the three crypto modules: all share the packet construction (``_construction.h``),
    libsodium and libcrypto, and the same warnings."""
    return Extension(
        name,
        [source],
        depends=["secureiod/secureio/_construction.h"],
        libraries=["sodium", "crypto"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        optional=True,
    )


setup(
    ext_modules=[
        _extension("secureiod.secureio._accel", "secureiod/secureio/_accel.c"),
        _extension("secureiod.secureio._rxbatch", "secureiod/secureio/_rxbatch.c"),
        _extension("secureiod.daemon._fastpath", "secureiod/daemon/_fastpath.c"),
        # TUN reads and writes in batches: system calls only, no crypto
        Extension(
            "secureiod._tunio",
            ["secureiod/_tunio.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
