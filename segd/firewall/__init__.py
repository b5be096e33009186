"""Enforcement: kernel plans rendered from instructions (pure), and the one module that runs them.

`render` (the container table) and `gate` (the host gate) turn instructions
into `plan.Plan` values, sharing the nft text of `nftext`; `nflog` and
`conntrack` say what is logged and counted and read it back; none of them
does I/O or loads ctypes. `kernel` is the only module that enters namespaces
or talks to nftables: it runs plans, lists tables, reads ports, and reads what
the tables log and conntrack counts.
"""
