"""The daemon's actors: one file each, all built on :class:`vesta.actors.base.VestaActor`."""
