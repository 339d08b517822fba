"""A gateway and its engine hosts as one mesh: who may talk to whom (peer_set), and whether a host's mutual-TLS
certificate and key are the ones the policy's mesh CA issued for it (host_identity)."""
