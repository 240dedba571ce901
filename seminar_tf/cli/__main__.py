"""``python -m seminar_tf.cli``: the ``seminar`` command."""

import sys

from seminar_tf.cli import main

sys.exit(main())
