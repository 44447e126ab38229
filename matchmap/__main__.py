from matchmap.cli import main

main()
