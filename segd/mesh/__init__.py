"""The segd mesh, host side: cluster-unique container addresses routed between
Docker hosts through one WireGuard interface per host.

Pure cores: the key pair (`keys`), the wireguard-go control protocol
(`uapi`), which WireGuard to run (`choice`), and the host's desired mesh state
as plans (`plan`: interface peers, routes, the host table that keeps pool
traffic on the interface, Docker's `DOCKER-USER` accepts). The root work (the
interface, its routes, wireguard-go, iptables) is done by
`segd.firewall.kernel.mesh`; the agent wires them (`segd.agent.mesh`).
"""
