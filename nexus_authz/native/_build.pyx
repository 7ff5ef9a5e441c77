# cython: language_level=3
"""How setup.py built the compiled modules (the same flags for all of them, in one build_ext run).

setup.py defines NEXUS_AUTHZ_PGO for the whole build: 1 for the profile-guided build (GCC's
-fprofile-use with the training's profile, nexus_authz/tools/pgo_train.py), 2 for the instrumented build
the training runs (-fprofile-generate: it writes .gcda files at exit and never stays installed), absent
for a plain build. nexus_authz.native reads KIND for its start-up line and native.BUILD.
"""

cdef extern from *:
    """
    #ifndef NEXUS_AUTHZ_PGO
    #define NEXUS_AUTHZ_PGO 0
    #endif
    """
    int NEXUS_AUTHZ_PGO

PGO = NEXUS_AUTHZ_PGO
KIND = "PGO" if PGO == 1 else "instrumented" if PGO == 2 else "plain"
