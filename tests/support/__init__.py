"""One support package for the tests, the benchmark (bench/) and the reliability campaign
(scripts/reliability.py): PostgreSQL provisioning (server), the one base config (config), one
recording aiohttp receiver (receiver), the daemon in-process and as a subprocess (daemon), and
free_port (net). Nothing here mocks the bridge: real servers, real processes."""
