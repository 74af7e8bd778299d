from zeroproxy.cli import main

main()
