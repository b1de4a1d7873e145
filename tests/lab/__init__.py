"""Several vesta hosts on one machine: network namespaces, a bridge per subnet, a router between."""
