from llmserve.entry import main

main()
