"""What the client and the server share: the parts of the wire contract written in Python.

- `codes`: the gRPC status codes by number and by name (an OperationError carries a number);
- `errors`: the StoreError tree a failed operation becomes on the calling side;
- `placement`: which member owns a key (rendezvous hashing, as store.proto specifies);
- `pipeline`: the Pipeline stream driver (batching, deadlines, resending);
- `channel`: the channel options for talking to a node, and the loopback check.

Nothing here imports nestkv.client or nestkv.server (tests/test_imports.py).
"""
