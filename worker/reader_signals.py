"""Imported by the reader processes' forkserver and by nothing else (``ReaderPool`` names it in the server's
preload): the server ignores SIGTERM and SIGINT, and every reader it forks inherits that from its first instruction.

A stop signal sent to the whole process group (Ctrl-C in a terminal, systemd's default KillMode=control-group,
``kill -TERM -PGID``) is the parent's to act on: it finishes or hands back what is in flight, then closes the pool.
A reader that set this only when its own code began could die of a signal that came while it was still starting,
and a server that died of one could start no other. The server still ends with its parent: multiprocessing's
forkserver exits on EOF from the pipe its parent holds open.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
