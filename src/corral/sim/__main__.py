"""``python -m corral.sim --port P --name N ...``"""

import typer

from corral.sim.cli import sim_command

typer.run(sim_command)
