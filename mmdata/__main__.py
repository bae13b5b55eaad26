from mmdata.cli.main import main

main()
