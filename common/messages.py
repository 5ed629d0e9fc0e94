"""Names that cross the client–server boundary in Flower messages: one place for both sides."""

WEIGHT = "num-examples"  # the FedAvg weight: a client's released (noisy) user count
UNIFORM = "uniform-weight"  # every client's update counts the same (client-level DP needs it)
REFUSED = "refused"  # a reply record: the client would not act on the request, and why
CLIENT = "client"  # a reply record: the client's name and the ledger entry of this release
LEDGER_HEADS = "ledger-heads"  # request config: each client's newest entry the server saw
