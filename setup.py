"""Build the optional C accelerator; everything else is in pyproject.toml.

The extension is ``optional``: where libsodium's or OpenSSL's headers (libsodium-dev,
libssl-dev) or a compiler are missing the install still succeeds and
``secureiod.secureio.packet`` uses its pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "secureiod.secureio._accel",
            ["secureiod/secureio/_accel.c"],
            depends=["secureiod/secureio/_construction.h"],
            libraries=["sodium", "crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "secureiod.secureio._rxbatch",
            ["secureiod/secureio/_rxbatch.c"],
            depends=["secureiod/secureio/_construction.h"],
            libraries=["sodium", "crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "secureiod.daemon._fastpath",
            ["secureiod/daemon/_fastpath.c"],
            depends=["secureiod/secureio/_construction.h"],
            libraries=["sodium", "crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
