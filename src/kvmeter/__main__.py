from kvmeter.cli import main

main()
