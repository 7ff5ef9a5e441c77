"""Suite-wide settings.

Hypothesis' per-example deadline is a timing assertion, and the suite asserts behaviour, never time: on a
loaded 2-core machine (CI, or several suites at once) a correct example can take longer than 200 ms.
Performance has its own figures under benchmarks/.
"""

from hypothesis import settings

settings.register_profile("nexus", deadline=None)
settings.load_profile("nexus")
